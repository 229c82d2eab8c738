"""The futex layer under Event, Condition, Semaphore and Barrier: C (``shmem._sync``) or ctypes.

Every one of those primitives is a block whose data starts with an internal
mutex (a glibc robust, process-shared, error-checking ``pthread_mutex_t``)
followed by 32-bit words (``sync_layout`` draws them). The protocol:

* A state change happens under the internal mutex, held only for a few
  loads and stores (never across user code or a wait). If its holder dies
  inside one, the kernel releases the mutex and the next taker hears so
  (``Memory.lock()`` returns True) and repairs: each kind keeps its updates
  such that a half-done one is harmless or redone from a journal.
* Waiting happens on the block's sequence word (``W_SEQ``): a waiter reads
  it (under the mutex, or before it looks at the state it waits for), and
  calls ``futex(FUTEX_WAIT, seen)``; a waker changes the state, bumps the
  word, and calls ``FUTEX_WAKE``. A wake between the read and the wait is
  not lost: the kernel returns at once when the word differs. Shared
  futexes (the waiters are in other processes), never pthread condition
  variables (glibc bug 21422: they hang for good when a waiter dies).
* A wait is one slice of at most ``SLICE_NS`` (50 ms, relative: the
  monotonic clock) with the GIL released; between slices the caller's loop
  recomputes the time left, runs signal handlers (Ctrl-C), and looks for
  dead processes where the kind needs to.

``Memory`` wraps a block's mapping with these calls, and ``Slots`` is the
per-process liveness of Semaphore and Barrier: an OFD lock on one byte of
the block's file per slot (``SLOT_LOCK_BASE + i``), taken on a descriptor
the handle keeps open. The kernel drops it when the process dies, so a slot
whose lock is free and whose words say "holding" or "waiting" belonged to a
dead process. OFD locks follow the open file description, which ``fork()``
shares: a child keeps its parent's slot alive until it exits, and takes a
slot of its own (on a new description) for its own use.

A state change written in Python holds the mutex with every signal blocked
in its thread (``block_signals``, which first runs the handlers already
due): a handler that ran in between could call the same object (the
mutex is error-checking: EDEADLK) or raise between the lock and the
``try`` that lets it go, leaving the mutex held by a live thread for good.
Handlers run right after the mutex is let go. (A signal that another thread
of the process catches still has its handler run in the main thread at any
bytecode: there a handler that calls the same object gets a RuntimeError.)

``SHMEM_PURE_PYTHON=1`` selects the ctypes twin (as ``lock_layout`` does);
``SHMEM_REQUIRE_SPEEDUPS=1`` makes a missing C build an ImportError.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, List, Optional, TypeVar, cast

from .. import _platform
from .._core.block import Block
from .._errors import SegmentNotFound
from . import lock_layout

SLICE_NS = lock_layout.SLICE_NS
SYNC_VERSION = 1  # the C side's SYNC_VERSION: its calls and this module's agree
MUTEX_OFFSET = 0
WORDS_OFFSET = 64  # the words start on the second cache line
W_SEQ = 0  # word index of the futex sequence word (relative to WORDS_OFFSET)

#: Byte SLOT_LOCK_BASE + i of the block's file is slot i's liveness lock (OFD,
#: past the end of any block; the users lock is at 1 << 62).
SLOT_LOCK_BASE = 1 << 61

_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
_MUTEX_ERRORCHECK = 2


_Timespec = lock_layout._Timespec  # the type the pthread calls' argtypes name


_syscall: Any = None


def _futex_call() -> Any:
    global _syscall
    if _syscall is None:
        number = _SYS_FUTEX.get(os.uname().machine)
        if number is None:
            raise ImportError(f"no futex system call number known for {os.uname().machine}")
        fn = ctypes.CDLL(None, use_errno=True).syscall
        fn.restype = ctypes.c_long
        _syscall = (fn, number)
    return _syscall


_SIGSET_SIZE = 128  # sizeof(sigset_t): 1024 bits, in glibc and the kernel's rt_sigprocmask ABI
_EVERY_SIGNAL = b"\xff" * _SIGSET_SIZE  # glibc leaves out the two it keeps for itself


def block_signals_py() -> bytes:
    """``_sync.block_signals``'s twin: block every signal in this thread, then run the Python
    handlers already due (one that raises puts the old mask back); the old mask. Through
    ctypes, not ``signal.pthread_sigmask``: that runs the handlers after changing the mask,
    and one that raises there loses the old mask (the thread would keep all signals blocked)."""
    old = ctypes.create_string_buffer(_SIGSET_SIZE)
    sigmask = lock_layout._libc().sigmask
    lock_layout._check_rc(sigmask(signal.SIG_BLOCK, None, old))  # only reads the mask
    try:  # a handler due may run at any bytecode from here until the flush below
        lock_layout._check_rc(sigmask(signal.SIG_BLOCK, _EVERY_SIGNAL, None))
        signal.pthread_kill(threading.get_ident(), 0)  # sends nothing; runs the handlers due
    except BaseException:
        sigmask(signal.SIG_SETMASK, old, None)
        raise
    return old.raw


def restore_signals_py(mask: bytes) -> None:
    """``_sync.restore_signals``'s twin."""
    if not isinstance(mask, bytes) or len(mask) != _SIGSET_SIZE:
        raise ValueError("restore_signals() takes what block_signals() returned")
    lock_layout._check_rc(lock_layout._libc().sigmask(signal.SIG_SETMASK, mask, None))


def let_go(calls: Any, offset: int) -> None:
    """Unlock the mutex at ``offset`` if this thread holds it: for a way out after an
    exception, which a signal handler may have raised where the mutex was free (between a
    wait and the lock after it). The mutex is error-checking: EPERM says it is not ours."""
    try:
        calls.unlock(offset)
    except OSError as err:
        if err.errno != errno.EPERM:
            raise


def new_sync_mutex_py() -> bytes:
    """A robust, process-shared, error-checking mutex, as bytes (``_sync.new_sync_mutex``'s twin)."""
    libc = lock_layout._libc()
    attr = ctypes.create_string_buffer(64)
    mutex = ctypes.create_string_buffer(lock_layout.MUTEX_SIZE)
    lock_layout._check_rc(libc.attr_init(attr))
    try:
        lock_layout._check_rc(libc.setpshared(attr, 1))
        lock_layout._check_rc(libc.setrobust(attr, 1))
        lock_layout._check_rc(libc.settype(attr, _MUTEX_ERRORCHECK))
        lock_layout._check_rc(libc.mutex_init(mutex, attr))
    finally:
        libc.attr_destroy(attr)
    return mutex.raw


_REENTERED = (
    "this thread is inside a state change of this shmem primitive already "
    "(used from a signal handler that interrupted it?)"
)


class _PyCalls:
    """The four calls through ctypes, on the mapping's address."""

    def __init__(self, mapping: Any) -> None:
        self._anchor: Any = ctypes.c_char.from_buffer(mapping)  # an export: the mapping stays while we do
        self._base = ctypes.addressof(self._anchor)
        self._libc = lock_layout._libc()
        self._futex = _futex_call()
        self._ts = _Timespec()

    def release(self) -> None:
        self._anchor = None

    def lock(self, offset: int) -> bool:
        libc, address = self._libc, ctypes.c_void_p(self._base + offset)
        rc = libc.trylock(address)
        ts = _Timespec()
        while rc in (errno.EBUSY, errno.ETIMEDOUT, errno.EINTR):
            end = time.monotonic_ns() + SLICE_NS
            if libc.clocklock is not None:
                ts.tv_sec, ts.tv_nsec = divmod(end, 1_000_000_000)
                rc = libc.clocklock(address, time.CLOCK_MONOTONIC, ctypes.byref(ts))
            else:
                ts.tv_sec, ts.tv_nsec = divmod(time.time_ns() + SLICE_NS, 1_000_000_000)
                rc = libc.timedlock(address, ctypes.byref(ts))
        if rc == errno.EOWNERDEAD:
            crc = libc.consistent(address)
            if crc:
                libc.unlock(address)
                raise lock_layout._lock_error(crc)
            return True
        if rc == errno.EDEADLK:
            raise RuntimeError(_REENTERED)
        if rc:
            raise lock_layout._lock_error(rc)
        return False

    def unlock(self, offset: int) -> None:
        lock_layout._check_rc(self._libc.unlock(ctypes.c_void_p(self._base + offset)))

    def wait(self, offset: int, expected: int, timeout_ns: int) -> bool:
        fn, number = self._futex
        if timeout_ns < 0 or timeout_ns > SLICE_NS:
            timeout_ns = SLICE_NS
        ts = _Timespec(*divmod(timeout_ns, 1_000_000_000))
        address = ctypes.c_void_p(self._base + offset)
        rc = fn(
            ctypes.c_long(number),
            address,
            ctypes.c_int(_FUTEX_WAIT),
            ctypes.c_uint(expected),
            ctypes.byref(ts),
            None,
            ctypes.c_int(0),
        )
        if rc == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            return True
        if err in (errno.ETIMEDOUT, errno.EINTR):
            return False
        raise OSError(err, os.strerror(err))

    def wake(self, offset: int, n: int) -> int:
        fn, number = self._futex
        address = ctypes.c_void_p(self._base + offset)
        rc = fn(ctypes.c_long(number), address, ctypes.c_int(_FUTEX_WAKE), ctypes.c_int(n), None, None, ctypes.c_int(0))
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(rc)


class _CCalls:
    """The four calls through ``shmem._sync``, on the mapping itself."""

    def __init__(self, mapping: Any) -> None:
        self._mapping = mapping

    def release(self) -> None:
        self._mapping = None

    def lock(self, offset: int) -> bool:
        return bool(_sync.sync_lock(self._mapping, offset))

    def unlock(self, offset: int) -> None:
        _sync.sync_unlock(self._mapping, offset)

    def wait(self, offset: int, expected: int, timeout_ns: int) -> bool:
        return bool(_sync.futex_wait(self._mapping, offset, expected, timeout_ns))

    def wake(self, offset: int, n: int) -> int:
        return int(_sync.futex_wake(self._mapping, offset, n))


_sync: Any = None
new_sync_mutex: Callable[[], bytes]
#: Block every signal in this thread (after running the handlers due; the old mask) / put a
#: mask back: what a critical section written in Python wraps itself in (see above).
block_signals: Callable[[], bytes]
restore_signals: Callable[[bytes], None]
_Calls: Any
if lock_layout.ACCELERATED:
    from .. import _sync

    if getattr(_sync, "SYNC_VERSION", None) != SYNC_VERSION:  # pragma: no cover - a stale build
        raise ImportError("shmem._sync is a stale build (no futex layer): reinstall shmem")
    new_sync_mutex, _Calls = _sync.new_sync_mutex, _CCalls
    block_signals, restore_signals = _sync.block_signals, _sync.restore_signals
    ACCELERATED = True
else:
    new_sync_mutex, _Calls = new_sync_mutex_py, _PyCalls
    block_signals, restore_signals = block_signals_py, restore_signals_py
    ACCELERATED = False


def calls(mapping: Any) -> Any:
    """The four calls (lock, unlock, wait, wake; each at a byte offset) on ``mapping``,
    through C or ctypes: for a kind that lays out its own words (``queue_ring``)."""
    return _Calls(mapping)


MUTEX_SIZE = lock_layout.MUTEX_SIZE
KIND_OFFSET = lock_layout.KIND_OFFSET
_MUTEX_KIND: Optional[bytes] = None


def mutex_kind() -> bytes:
    """The ``__kind`` word of the internal mutex this process initialises (checked on attach)."""
    global _MUTEX_KIND
    if _MUTEX_KIND is None:
        _MUTEX_KIND = new_sync_mutex()[KIND_OFFSET : KIND_OFFSET + 4]
    return _MUTEX_KIND


def forever_or_ns(timeout: Any) -> int:
    """A ``wait(timeout)`` argument as nanoseconds, -1 for forever (None).
    Negative timeouts count as 0, as in threading."""
    if timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be None or a number of seconds, not {type(timeout).__name__}")
    try:
        seconds = float(timeout)
    except OverflowError:
        return -1 if timeout > 0 else 0
    if seconds != seconds:
        raise ValueError("timeout must not be NaN")
    if seconds <= 0:
        return 0
    return -1 if seconds * 1e9 >= 2**62 else int(seconds * 1e9)


class Deadline:
    """The end of a wait on the monotonic clock (``ns`` < 0: none)."""

    __slots__ = ("end",)

    def __init__(self, ns: int) -> None:
        self.end = -1 if ns < 0 else time.monotonic_ns() + ns

    def left(self) -> int:
        """Nanoseconds left (-1: forever; 0: over)."""
        if self.end < 0:
            return -1
        return max(0, self.end - time.monotonic_ns())


class Flight:
    """The calls inside a mapping right now, so that ``close()`` by another thread meanwhile
    leaves the mapping to the last of them: its memory goes with the last reference, and a
    call asleep in a futex or mutex wait (the GIL released) would touch it after an unmap, a
    segfault. (The queue's C core counts its calls the same way.) ``list.append`` and
    ``list.pop`` are each one step under the GIL: no count is lost to a thread switch."""

    def __init__(self, what: str) -> None:
        self.what = what  # "the shmem.Event", for errors
        self.closed = False
        self._calls: List[None] = []
        self._let_go: Optional[Callable[[], None]] = None

    def enter(self) -> None:
        if self.closed:
            raise ValueError(f"{self.what} is closed")
        self._calls.append(None)

    def leave(self) -> None:
        self._calls.pop()
        if self.closed and not self._calls:
            self._finish()

    def close(self, let_go: Callable[[], None]) -> None:
        """No call from now on; ``let_go()`` once the last one in flight is out (now if none is)."""
        if self.closed:
            return
        self._let_go, self.closed = let_go, True
        if not self._calls:
            self._finish()

    def _finish(self) -> None:
        let_go, self._let_go = self._let_go, None
        if let_go is not None:
            let_go()

    def check_open(self) -> None:
        """After a wait: the handle was closed meanwhile (a ValueError)."""
        if self.closed:
            raise ValueError(f"{self.what} was closed while this call waited")


_Method = TypeVar("_Method", bound=Callable[..., Any])


def in_flight(method: _Method) -> _Method:
    """A method of an object with a ``flight`` (``Flight``), counted in for its whole run."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        flight = self.flight
        flight.enter()
        try:
            return method(self, *args, **kwargs)
        finally:
            flight.leave()

    return cast(_Method, call)


class Memory:
    """A primitive's mapping: its words, its internal mutex and futex calls on it.

    ``lock``/``unlock`` and ``wait`` count as calls in flight (``Flight``): ``release``
    while another thread is inside leaves the mapping to it, and a wait that ends on a
    closed handle raises ValueError."""

    def __init__(self, mapping: Any, words: int, what: str = "the primitive") -> None:
        self._calls = _Calls(mapping)
        self._mask = b""  # the signal mask to restore at unlock
        view = memoryview(mapping)
        self._view = view
        self.words = view[WORDS_OFFSET : WORDS_OFFSET + 4 * words].cast("I")
        self.flight = Flight(what)

    def release(self, then: Callable[[], None] = lambda: None) -> None:
        """This handle is closed: the views go, and ``then()`` runs, once no call is inside."""

        def let_go() -> None:
            self.words.release()
            self._view.release()
            self._calls.release()
            then()

        self.flight.close(let_go)

    def lock(self) -> bool:
        """Take the internal mutex, with every signal blocked in this thread until ``unlock``
        (see above); True when its holder died in a state change (repair now)."""
        self.flight.enter()
        try:
            mask = block_signals()
            try:
                died = bool(self._calls.lock(MUTEX_OFFSET))
            except BaseException:
                restore_signals(mask)
                raise
        except BaseException:
            self.flight.leave()
            raise
        self._mask = mask  # only the holder reads or writes it
        return died

    def unlock(self) -> None:
        mask, ours = self._mask, True
        try:
            self._calls.unlock(MUTEX_OFFSET)
        except OSError as err:
            ours = err.errno != errno.EPERM  # not ours: nor are the mask and the count to put back
            raise
        finally:
            if ours:
                restore_signals(mask)
                self.flight.leave()

    def forget_lock(self) -> None:
        """In a child forked while this thread held the mutex (``lock``): the parent lets
        go of it, not the child; here only the signal mask and the count go back."""
        restore_signals(self._mask)
        self.flight.leave()

    def bump(self) -> None:
        """Bump the sequence word (under the mutex)."""
        self.words[W_SEQ] = (self.words[W_SEQ] + 1) & 0xFFFFFFFF

    def wait(self, seen: int, timeout_ns: int) -> bool:
        """One slice of waiting while the sequence word is ``seen`` (signal handlers run after).
        ValueError if the handle was closed meanwhile."""
        self.flight.enter()
        try:
            woken = bool(self._calls.wait(WORDS_OFFSET + 4 * W_SEQ, seen, timeout_ns))
        finally:
            self.flight.leave()
        self.flight.check_open()
        return woken

    def wake(self, n: int = 0x7FFFFFFF) -> None:
        if self.flight.closed:  # by another thread since our change: waiters see it within a slice
            return
        self.flight.enter()
        try:
            self._calls.wake(WORDS_OFFSET + 4 * W_SEQ, n)
        finally:
            self.flight.leave()


# ------------------------------------------------------------------ liveness slots


def lock_slot(fd: int, i: int) -> bool:
    """Take slot ``i``'s liveness lock on descriptor ``fd``: False if another description holds it."""
    return _platform.try_lock_exclusive(fd, SLOT_LOCK_BASE + i)


def unlock_slot(fd: int, i: int) -> None:
    _platform.unlock_byte(fd, SLOT_LOCK_BASE + i)


def slot_locked(fd: int, i: int) -> bool:
    """Whether a description other than ``fd``'s holds slot ``i``'s liveness lock (a live process)."""
    return _platform.is_locked(fd, SLOT_LOCK_BASE + i)


class Slots:
    """This handle's slot among ``count`` (claimed on first use), and tests of
    other slots' liveness. ``claimed`` is called under the internal mutex with
    a slot just taken, to clear what a dead earlier owner left in it."""

    def __init__(self, block: Block, count: int) -> None:
        self._name, self._inode, self._count = block.name, block.inode, count
        self._fd = -1
        self._pid = 0
        self.slot = -1
        self._guard = threading.RLock()  # threads of this process share the handle

    def fd(self) -> int:
        """Our descriptor of the block (opened on first use; again in a forked child)."""
        with self._guard:
            return self._fd_locked()

    def _still_ours(self) -> bool:
        """Whether our descriptor number still refers to the block (os.closerange)."""
        return _platform.still_open(self._fd, self._inode)

    def _fd_locked(self) -> int:
        if self._fd >= 0 and self._pid != os.getpid():
            # A forked child: the inherited description holds the parent's slot. Leave it to the parent.
            if self._still_ours():
                os.close(self._fd)
            self._fd, self.slot = -1, -1
        elif self._fd >= 0 and not self._still_ours():
            # Closed behind our back (os.closerange): our slot's lock went with it, so other
            # processes may already have taken back what it held. Never close the number
            # (it may be someone else's file now); claim a slot afresh.
            self._fd, self.slot = -1, -1
        if self._fd < 0:
            opened = _platform.open_existing(self._name)
            if opened.inode != self._inode:
                os.close(opened.fd)
                raise SegmentNotFound(self._name, "the primitive's block was removed and replaced")
            self._fd, self._pid = opened.fd, os.getpid()
        return self._fd

    def claim(self, enter: Callable[[], object], leave: Callable[[], None], claimed: Callable[[int], None]) -> int:
        """This handle's slot, taking a free one if it has none (OSError when all
        are taken); ``claimed(i)`` runs between ``enter()`` and ``leave()`` (the
        primitive's internal mutex, repairs included)."""
        with self._guard:
            return self._claim(enter, leave, claimed)

    def _claim(self, enter: Callable[[], object], leave: Callable[[], None], claimed: Callable[[int], None]) -> int:
        fd = self._fd_locked()
        if self.slot >= 0:
            return self.slot
        start = os.getpid() % self._count
        for k in range(self._count):
            i = (start + k) % self._count
            if not lock_slot(fd, i):
                continue
            try:
                enter()
                try:
                    claimed(i)
                finally:
                    leave()
            except BaseException:
                unlock_slot(fd, i)
                raise
            self.slot = i
            return i
        raise OSError(errno.EAGAIN, f"all {self._count} process slots of this shmem primitive are taken", self._name)

    def own(self) -> int:
        """The slot this process claimed through this handle, -1 if none (or inherited across fork)."""
        return self.slot if self.slot >= 0 and self._pid == os.getpid() else -1

    def alive(self, i: int) -> bool:
        """Whether slot ``i`` is held by a live process (ours counts as alive)."""
        fd = self.fd()
        if i == self.slot:
            return True
        return slot_locked(fd, i)

    def close(self) -> None:
        with self._guard:
            ours = self._fd >= 0 and self._still_ours()
            fd, self._fd, self.slot = self._fd, -1, -1
        if ours:
            os.close(fd)

    def __del__(self) -> None:
        if self._fd >= 0 and os is not None:
            self.close()
