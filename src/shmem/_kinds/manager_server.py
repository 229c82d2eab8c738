"""The manager process's side of SharedMemoryManager, and what both sides share.

The client side - ``SharedMemoryManager``, the hand-over of each block a
process creates, calls with a timeout - is ``manager``, which imports this
module (never the other way round). Here:

* what both sides use: ``Session`` (a manager's name prefix, its hand-over
  socket and the token that opens it), ``hold`` (a descriptor that makes its
  holder a user of a block), ``remove_leftovers`` (what a killed manager left),
  ``ManagedBlock`` (what ``blocks()`` reports);
* what runs in the manager process: ``SharedMemoryServer`` (the standard
  library's ``Server`` with the protocol of its ``SharedMemoryServer`` and
  shmem's hand-over), the blocks it holds (``_Owned``) and the thread that
  takes them in and watches the process that started it; ``ServerSetup``, the
  manager process's initializer.

Names a client sends - ``track_segment``, ``release_segment``, a hand-over -
are input: each passes ``names.validate`` (one entry directly inside
/dev/shm) before the manager touches the file system with it.

How the manager keeps its blocks
--------------------------------
The manager keeps one descriptor per block (it raises its own limit on open
files). Blocks whose name someone removed are let go within a second, so
their memory is freed. ``shutdown()`` and the manager's end remove every block
it holds, then every block under its prefix whose header says
manager-owned: that also catches blocks whose hand-over never arrived (a
creator killed between the two steps).

When something dies
-------------------
* The process that started the manager dies, however (SIGKILL too): the
  manager polls it (pid and start time) every ``WATCH_INTERVAL``, removes its
  blocks and exits - well within 2 seconds.
* Ctrl-C: the server process ignores SIGINT (as the standard library's does)
  so the starter's ``with`` block, or its exit, shuts it down cleanly.
* SIGTERM to the manager, even before it serves: it removes its blocks and
  exits (``SystemExit``; a ``multiprocessing.util.Finalize`` runs the removal
  on every way out of a ``multiprocessing`` process but SIGKILL).

Linux only, like the rest of shmem: the hand-over socket lives in the abstract
namespace (nothing on disk to leak); another platform would bind it to a path
in a private directory.
"""

from __future__ import annotations

import array
import hmac
import os
import secrets
import select
import signal
import socket
import struct
import threading
import time
from multiprocessing import managers, util
from multiprocessing.context import ProcessError
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .. import _platform
from .._core import names
from .._core.block import hold_users_lock
from .._core.header import FLAG_MANAGED, KIND_NAMES, Header
from .._errors import CorruptSegment

__all__ = ["ManagedBlock", "ServerSetup", "Session", "SharedMemoryServer", "hold", "remove_leftovers"]

#: How often the manager checks that the process that started it is alive.
WATCH_INTERVAL = 0.1
#: How often the manager lets go of blocks whose name was removed (freeing their memory).
PRUNE_INTERVAL = 1.0
#: How long the manager lets hand-overs gather before it takes them in.
BATCH_SECONDS = 0.002

_HELLO = b"shmem-smm/1 "  # + the session token: the first message on a hand-over connection
_NAME_MAX = 1024  # a name's UTF-8 bytes are at most NAME_MAX (255): generous
_ANCILLARY = socket.CMSG_SPACE(4 * 8)  # room for a few descriptors: extra ones are closed


# ===================================================================== shared by both sides


class ManagedBlock(NamedTuple):
    """A block a manager owns, as ``SharedMemoryManager.blocks()`` reports it."""

    name: str
    kind: str  # "raw" (SharedMemory), "list" (ShareableList), "array" (NumPy)
    size: int  # bytes, as requested when it was created
    creator_pid: Optional[int]  # None for a block shmem did not make (tracked by name)


class Session(NamedTuple):
    """One running manager, as its clients need to know it to hand it blocks.

    Made by ``start()`` in the starting process (``new``), passed to the
    manager process by its initializer, and told to clients that connect by
    address through the ``shmem_session`` call (``wire``/``from_wire``).
    """

    prefix: str  # every block name starts with it
    handover: bytes  # abstract-namespace address of the hand-over socket
    token: bytes  # proves on that socket that the client knows the authkey
    parent: Optional[_platform.ProcessIdentity] = None  # the manager exits when it dies

    @classmethod
    def new(cls, parent: Optional[_platform.ProcessIdentity]) -> Session:
        """A new session; a bad ``SHMEM_NAME_PREFIX`` fails here (InvalidName), at ``start()``."""
        # The core's generated names carry SHMEM_NAME_PREFIX and are unguessable;
        # one of them, plus "_", is this manager's own prefix.
        prefix = names.generate() + "_"
        names.validate(prefix + "0" * 8)  # the blocks' names fit too
        return cls(prefix, b"\0shmem-smm-" + secrets.token_hex(8).encode(), secrets.token_bytes(16), parent)

    def wire(self) -> Tuple[str, str, str]:
        """What a client needs, as plain strings (any serializer carries them)."""
        return self.prefix, self.handover.hex(), self.token.hex()

    @classmethod
    def from_wire(cls, wire: Sequence[str]) -> Session:
        prefix, handover, token = wire
        return cls(prefix, bytes.fromhex(handover), bytes.fromhex(token))

    def greeting(self) -> bytes:
        """The first message on a hand-over connection."""
        return _HELLO + self.token

    def new_name(self) -> str:
        """A new block name under this manager's prefix (the caller retries on a collision)."""
        return self.prefix + secrets.token_hex(4)


def hold(name: str) -> int:
    """A read-only descriptor of block ``name`` that holds its users lock.

    Whoever holds it counts as a user of the block (``_core.lifecycle``): no
    reaper removes the block while the descriptor lives, in this process or
    in the one it is passed to. SegmentNotFound (FileNotFoundError) if there
    is no such block, or it was removed while we waited for the lock;
    InvalidName (ValueError) before anything happens for a bad name.
    """
    return hold_users_lock(names.validate(name)).fd


def remove_leftovers(prefix: str) -> None:
    """Remove every manager-owned block whose name starts with ``prefix``: what
    a killed manager (or a creator killed before its hand-over) left."""
    for name, inode, _ in _managed_under(prefix):
        _remove(name, inode)


def _is_managed(header: Optional[Header]) -> bool:
    return header is not None and bool(header.flags & FLAG_MANAGED)


def _managed_under(prefix: str) -> List[Tuple[str, int, Header]]:
    """(name, inode, header) of every manager-owned block whose name starts with ``prefix``."""
    found = []
    for name in _platform.entries():
        if not name.startswith(prefix):
            continue
        try:
            opened = _platform.open_existing(name, writable=False)
        except (OSError, ValueError):  # gone, not a plain file, not a block name
            continue
        try:
            header = Header.read(opened.fd, opened.size, name)
        except (CorruptSegment, OSError):
            continue
        finally:
            os.close(opened.fd)
        if header is not None and _is_managed(header):
            found.append((name, opened.inode, header))
    return found


def _remove(name: str, inode: int) -> None:
    """Unlink ``name`` if it still is this very block (never a newer one); nothing else."""
    try:
        _platform.unlink_same(name, inode)
    except OSError:
        pass  # removed meanwhile, or not ours to remove: nothing is left to do either way


def _valid_name(name: str) -> bool:
    try:
        names.validate(name)
    except (ValueError, TypeError):
        return False
    return True


# ===================================================================== the manager process


_next_session: Optional[Session] = None  # set in the manager process before its server is made


class ServerSetup:
    """The manager process's initializer: gives the server its session, lets
    SIGTERM end it cleanly, lets it hold a descriptor per block, then runs the
    user's initializer."""

    def __init__(self, session: Session, initializer: Optional[Callable[..., object]]) -> None:
        self.session = session
        self.initializer = initializer

    def __call__(self, *initargs: Any) -> None:
        global _next_session
        _next_session = self.session
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        _raise_open_file_limit()
        if self.initializer is not None:
            self.initializer(*initargs)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # the server's finalizer removes the blocks


class _Held(NamedTuple):
    fd: int  # a descriptor of the block, holding its users lock
    adopted: bool  # tracked by name (track_segment): removed even without a shmem header


class _Owned:
    """The blocks a manager owns, and the thread that takes them in and watches its parent.

    Taking a block in is cheap - its name and descriptor go into a dict - so the
    manager keeps up with any number of creating processes; the block is looked
    at (header, inode) only when it is listed or removed. Every method that reads
    or changes the set holds ``_lock`` and first takes in everything waiting on
    the hand-over socket: a block handed over before a call is always seen by it.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self._lock = threading.Lock()
        self._held: Dict[str, _Held] = {}
        self._conns: Dict[int, Tuple[socket.socket, bool]] = {}  # fd -> (connection, authenticated)
        self._closed = False
        self._pruned = (time.monotonic(), 0)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(session.handover)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)

    def start(self, on_parent_death: Callable[[], None]) -> None:
        threading.Thread(target=self._run, args=(on_parent_death,), name="shmem-manager", daemon=True).start()

    def _run(self, on_parent_death: Callable[[], None]) -> None:
        parent = self.session.parent
        try:
            while True:
                if self._epoll.poll(WATCH_INTERVAL):
                    # Let hand-overs gather: a sender wakes nobody while we sleep, so
                    # creating processes pay no context switch per block.
                    time.sleep(BATCH_SECONDS)
                with self._lock:
                    if self._closed:
                        return
                    try:
                        self._take_in()
                        since, count = self._pruned
                        if time.monotonic() - since > PRUNE_INTERVAL or len(self._held) > 2 * count + 256:
                            self._prune()
                    except Exception as err:  # never let one bad message end the manager
                        util.info("shmem manager: %r", err)
                if parent is not None and _platform.process_alive(parent) is False:
                    on_parent_death()
                    return
        finally:
            self._epoll.close()

    # ---- taking blocks in

    def _take_in(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # none waiting (or out of descriptors: the client will find out)
                break
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid not in (os.getuid(), 0):
                conn.close()
                continue
            conn.setblocking(False)
            self._conns[conn.fileno()] = (conn, False)
            self._epoll.register(conn.fileno(), select.EPOLLIN)
        for fd, (conn, authenticated) in list(self._conns.items()):
            self._read(fd, conn, authenticated)

    def _read(self, fd: int, conn: socket.socket, authenticated: bool) -> None:
        prefix = self.session.prefix
        while True:
            try:
                data, ancillary, _, _ = conn.recvmsg(_NAME_MAX, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancillary = b"", []
            fds = _descriptors(ancillary)
            if not authenticated and hmac.compare_digest(data, self.session.greeting()):
                authenticated = True
                self._conns[fd] = (conn, True)
                data = b""  # nothing to hold in this message
            elif not authenticated or not data:  # a stranger, or the client closed
                _close_all(fds)
                self._drop_connection(fd, conn)
                return
            name = data.decode("utf-8", "surrogateescape")
            # The name is input: one entry directly inside /dev/shm, under our prefix.
            if fds and name.startswith(prefix) and _valid_name(name):
                self._keep(name, _Held(fds.pop(0), False))
            # No descriptor (beyond our limit): the block is still found under the prefix.
            _close_all(fds)

    def _keep(self, name: str, held: _Held) -> None:
        previous = self._held.get(name)
        self._held[name] = held
        if previous is not None:
            os.close(previous.fd)

    def _drop_connection(self, fd: int, conn: socket.socket) -> None:
        self._conns.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        conn.close()

    def adopt(self, name: str) -> None:
        """Hold a block made elsewhere (the standard library's ``track_segment``).
        InvalidName (ValueError) for a name that is not one entry of /dev/shm."""
        name = names.validate(name)  # a client's name is input: checked before anything is touched
        with self._lock:
            self._check_open()
            self._keep(name, _Held(hold(name), True))

    # ---- looking at them, letting go, removing

    def _current(self, name: str, held: _Held) -> Tuple[Optional[int], Optional[Header]]:
        """(inode, header) of a held block still published under its name and still
        one to remove; (None, None) if its name was removed or is not the manager's."""
        try:
            st = os.fstat(held.fd)
            if not _platform.still_published(name, st.st_ino):
                return None, None
            header = Header.read(held.fd, st.st_size, name)
        except (OSError, CorruptSegment):
            return None, None
        if not (held.adopted or _is_managed(header)):
            return None, None
        return st.st_ino, header

    def _prune(self) -> None:
        """Let go of blocks whose name was removed: their memory is freed with our descriptor."""
        for name, held in list(self._held.items()):
            try:
                published = _platform.still_published(name, os.fstat(held.fd).st_ino)
            except OSError:
                published = False
            if not published:
                del self._held[name]
                os.close(held.fd)
        self._pruned = (time.monotonic(), len(self._held))

    def blocks(self) -> List[ManagedBlock]:
        with self._lock:
            self._check_open()
            self._take_in()
            found = {}
            for name, held in list(self._held.items()):
                inode, header = self._current(name, held)
                if inode is None:
                    del self._held[name]
                    os.close(held.fd)
                elif header is None:
                    found[name] = ManagedBlock(name, "raw", os.fstat(held.fd).st_size, None)
                else:
                    found[name] = ManagedBlock(name, KIND_NAMES[header.kind], header.size, header.creator.pid)
            for name, _, header in _managed_under(self.session.prefix):
                if name not in found:  # created, never handed over (its creator died in between)
                    found[name] = ManagedBlock(name, KIND_NAMES[header.kind], header.size, header.creator.pid)
            return sorted(found.values())

    def release(self, name: str) -> None:
        """Remove one block (the standard library's ``release_segment``). InvalidName
        (ValueError) for a name that is not one entry of /dev/shm, ValueError for
        a block the manager does not own; either way nothing is touched."""
        name = names.validate(name)
        with self._lock:
            self._check_open()
            self._take_in()
            held = self._held.pop(name, None)
            if held is None:
                raise ValueError(f"shared memory block {name!r} is not owned by this manager")
            self._remove_held(name, held)

    def _remove_held(self, name: str, held: _Held) -> None:
        inode, _ = self._current(name, held)
        if inode is not None:
            _remove(name, inode)
        os.close(held.fd)

    def remove_all(self) -> None:
        """Remove every block; afterwards the manager takes no more. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._take_in()
            finally:
                # Closing the sockets first: a hand-over still in flight fails in its
                # sender, who removes its block; one already queued is found below.
                self._closed = True
                for fd, (conn, _) in list(self._conns.items()):
                    self._drop_connection(fd, conn)
                self._listener.close()
                for name, held in self._held.items():
                    self._remove_held(name, held)
                self._held.clear()
                remove_leftovers(self.session.prefix)

    def _check_open(self) -> None:
        if self._closed:
            raise ProcessError("the SharedMemoryManager is shutting down")


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def _descriptors(ancillary: Iterable[Tuple[int, int, bytes]]) -> List[int]:
    fds: List[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return fds


def _raise_open_file_limit() -> None:
    """The manager holds a descriptor per block: allow as many as the hard limit does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class SharedMemoryServer(managers.Server):
    """The manager process's server: the standard library's ``SharedMemoryServer``
    protocol (``track_segment``, ``release_segment``, ``list_segments``, so its
    clients work too) plus shmem's hand-over of blocks."""

    public = managers.Server.public + [
        "track_segment",
        "release_segment",
        "list_segments",
        "shmem_session",
        "shmem_blocks",
    ]

    stop_event: threading.Event  # made by serve_forever

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _next_session
        super().__init__(*args, **kwargs)
        session, _next_session = _next_session or Session.new(None), None
        self.owned = _Owned(session)
        # Whatever ends the process - shutdown, its parent's death, SIGTERM even
        # before serve_forever - its blocks are removed on the way out:
        # multiprocessing runs finalizers when its process ends (and atexit elsewhere).
        util.Finalize(self, self.owned.remove_all, exitpriority=10)

    def serve_forever(self) -> None:
        self.owned.start(on_parent_death=self._parent_died)
        try:
            super().serve_forever()
        finally:
            self.owned.remove_all()

    def _parent_died(self) -> None:
        self.owned.remove_all()
        self.stop_event.set()

    def shutdown(self, c: Any) -> None:
        """Remove every block, then stop (and answer: the caller knows they are gone)."""
        self.owned.remove_all()
        super().shutdown(c)

    # Plain str / int / None: any serializer carries them (xmlrpclib has no bytes or NamedTuples).

    def shmem_session(self, c: Any) -> Tuple[str, str, str]:
        return self.owned.session.wire()

    def shmem_blocks(self, c: Any) -> List[Tuple[str, str, int, Optional[int]]]:
        return [tuple(block) for block in self.owned.blocks()]  # type: ignore[misc]

    def track_segment(self, c: Any, segment_name: str) -> None:
        self.owned.adopt(segment_name)

    def release_segment(self, c: Any, segment_name: str) -> None:
        self.owned.release(segment_name)

    def list_segments(self, c: Any) -> List[str]:
        return [block.name for block in self.owned.blocks()]


# Shown, and pickled by reference, under the public module that re-exports them.
ManagedBlock.__module__ = "shmem.managers"
SharedMemoryServer.__module__ = "shmem.managers"
