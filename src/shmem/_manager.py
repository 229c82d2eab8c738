"""SharedMemoryManager: the standard library's, and it never leaks.

API: ``multiprocessing.managers.SharedMemoryManager`` of Python 3.13 -
``SharedMemoryManager(address=None, authkey=None)``, ``start()``,
``shutdown()``, ``connect()``, ``address``, use as a context manager,
``SharedMemory(size)``, ``ShareableList(sequence)``, the same errors - plus
NumPy arrays (``zeros``, ``empty``, ``full``, ``array``) and ``blocks()``,
what the manager owns. It is the standard library's ``BaseManager`` (start,
connect, authentication, the server process, its SIGINT immunity) with a
server of its own.

What "owns" means, and how it is kept
-------------------------------------
A block made through the manager lives until the manager shuts down - whoever
made it, whichever processes exit meanwhile - as in the standard library. Then
it is removed, every one of them, also those someone already unlinked (the
standard library stops at the first one missing and leaks the rest).

Creating a block costs no round trip to the manager (an RPC costs ~100 us, a
block ~60 us). Each process creates the blocks itself, under the manager's
name prefix (``<SHMEM_NAME_PREFIX or shmem_>smm<8 hex>_``) with the header's
manager-owned flag and ``track=True``, then hands the manager a file
descriptor of the block on which it took the users lock (``_lifecycle``), over
a Unix socket (SCM_RIGHTS): one ``sendmsg``, no answer awaited. From that
moment the manager is a user of the block - even while the descriptor is still
in flight - so the block outlives its creator, and nothing can remove it but
the manager or an explicit ``unlink()``. (Naming the block in a one-way message
and letting the manager open it would leave a window: a creator killed before
the manager opened it would have its block removed by its reaper. Listing
/dev/shm for the prefix alone would leave that window open for good, and
make a block made by a worker that exits disappear.)

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
* The manager process dies: the kernel closes its descriptors, the users locks
  go with them, and each block falls back to the core lifecycle - removed once
  its creator and every process using it are gone (by the creator's reaper,
  or ``shmem.gc()`` if everything was killed at once). The starting process
  also removes whatever is under the prefix when it shuts the manager down.
  Clients get ``ManagerUnavailable`` (a ConnectionRefusedError and a
  FileNotFoundError, the errors the standard library raises then) naming the
  manager's address: at once when it is gone, after ``CALL_TIMEOUT`` when it
  is alive but does not answer; never a hang.
* Ctrl-C: the server process ignores SIGINT (as the standard library's does)
  so the starter's ``with`` block, or its exit, shuts it down cleanly.
* SIGTERM to the manager: it removes its blocks and exits.

Linux only, like the rest of shmem: the hand-over socket lives in the abstract
namespace (nothing on disk to leak); another platform would bind it to a path
in a private directory.
"""

from __future__ import annotations

import array
import errno
import hmac
import os
import secrets
import select
import signal
import socket
import struct
import threading
import time
from multiprocessing import connection, managers, util
from multiprocessing.context import BaseContext, ProcessError
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, TypeVar

from . import _lifecycle, _names, _platform
from ._errors import CorruptSegment, SegmentExists, ShmemError
from ._header import FLAG_MANAGED, KIND_NAMES, Header
from ._list import ShareableList
from ._memory import SharedMemory

if TYPE_CHECKING:
    from ._array import SharedArray

__all__ = ["ManagedBlock", "ManagerNotStarted", "ManagerUnavailable", "SharedMemoryManager", "SharedMemoryServer"]

#: How often the manager checks that the process that started it is alive.
WATCH_INTERVAL = 0.1
#: How long a client waits for a manager that is alive but does not answer.
CALL_TIMEOUT = 5.0
#: ... and for one that is removing its blocks on shutdown (the starter then removes what is left).
SHUTDOWN_TIMEOUT = 30.0
#: How often the manager lets go of blocks whose name was removed (freeing their memory).
PRUNE_INTERVAL = 1.0
#: How long the manager lets hand-overs gather before it takes them in.
BATCH_SECONDS = 0.002

_HELLO = b"shmem-smm/1 "  # + the session token: the first message on a hand-over connection
_NAME_MAX = 1024  # a name's UTF-8 bytes are at most NAME_MAX (255): generous
_ANCILLARY = socket.CMSG_SPACE(4 * 8)  # room for a few descriptors: extra ones are closed
_T = TypeVar("_T")
_State = managers.State  # type: ignore[attr-defined]
_GONE = "is gone: it was shut down or its process was killed"


class ManagerNotStarted(ShmemError, ValueError):
    """The manager was never started and has no address to reach it at (the
    standard library raises ValueError too)."""


class ManagerUnavailable(ShmemError, ConnectionRefusedError, FileNotFoundError):
    """The manager is gone (shut down or killed) or does not answer.

    Both ConnectionRefusedError and FileNotFoundError, what the standard library
    raises for a killed and a shut-down manager; ``filename`` is its address.
    """


class ManagedBlock(NamedTuple):
    """A block a manager owns, as ``SharedMemoryManager.blocks()`` reports it."""

    name: str
    kind: str  # "raw" (SharedMemory), "list" (ShareableList), "array" (NumPy)
    size: int  # bytes, as requested when it was created
    creator_pid: Optional[int]  # None for a block shmem did not make (tracked by name)


def _unavailable(address: object, cause: str, code: int = errno.ECONNREFUSED) -> ManagerUnavailable:
    return ManagerUnavailable(code, f"the SharedMemoryManager {cause}", str(address))


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
        except OSError:
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
    if _platform.still_published(name, inode):
        try:
            _platform.unlink(name)
        except OSError:
            pass  # removed meanwhile, or not ours to remove: nothing is left to do either way


# ===================================================================== the server side


class _Config(NamedTuple):
    prefix: str  # every block name starts with it
    handover: bytes  # abstract-namespace address of the hand-over socket
    token: bytes  # proves on that socket that the client knows the authkey
    parent: Optional[_platform.ProcessIdentity]  # the manager exits when it dies


def _new_config(parent: Optional[_platform.ProcessIdentity]) -> _Config:
    base = os.environ.get(_names.PREFIX_ENV) or _names._GENERATED_PREFIX
    prefix = f"{base}smm{secrets.token_hex(4)}_"
    _names.validate(prefix + "0" * 8)  # a bad SHMEM_NAME_PREFIX fails here, at start()
    return _Config(prefix, b"\0shmem-smm-" + secrets.token_hex(8).encode(), secrets.token_bytes(16), parent)


_next_config: Optional[_Config] = None  # set in the manager process before its server is made
_serving: Optional["_Owned"] = None  # the manager process's blocks, once its server is made


class _ServerSetup:
    """The manager process's initializer: gives the server its configuration,
    lets SIGTERM end it cleanly, lets it hold a descriptor per block, then runs
    the user's initializer."""

    def __init__(self, config: _Config, initializer: Optional[Callable[..., object]]) -> None:
        self.config = config
        self.initializer = initializer

    def __call__(self, *initargs: Any) -> None:
        global _next_config
        _next_config = self.config
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        _raise_open_file_limit()
        if self.initializer is not None:
            self.initializer(*initargs)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # serve_forever's `finally` removes the blocks


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

    def __init__(self, config: _Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._held: Dict[str, _Held] = {}
        self._conns: Dict[int, Tuple[socket.socket, bool]] = {}  # fd -> (connection, authenticated)
        self._closed = False
        self._pruned = (time.monotonic(), 0)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(config.handover)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)

    def start(self, on_parent_death: Callable[[], None]) -> None:
        threading.Thread(target=self._run, args=(on_parent_death,), name="shmem-manager", daemon=True).start()

    def _run(self, on_parent_death: Callable[[], None]) -> None:
        parent = self.config.parent
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
        prefix = self.config.prefix
        while True:
            try:
                data, ancillary, _, _ = conn.recvmsg(_NAME_MAX, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancillary = b"", []
            fds = _descriptors(ancillary)
            if not authenticated and hmac.compare_digest(data, _HELLO + self.config.token):
                authenticated = True
                self._conns[fd] = (conn, True)
                data = b""  # nothing to hold in this message
            elif not authenticated or not data:  # a stranger, or the client closed
                _close_all(fds)
                self._drop_connection(fd, conn)
                return
            name = data.decode("utf-8", "surrogateescape")
            if fds and name.startswith(prefix) and "/" not in name:
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
        """Hold a block made elsewhere (the standard library's ``track_segment``)."""
        with self._lock:
            self._check_open()
            opened = _platform.open_existing(name, writable=False)
            try:
                _platform.lock_shared(opened.fd, _lifecycle.USERS_LOCK)
            except BaseException:
                os.close(opened.fd)
                raise
            self._keep(name, _Held(opened.fd, True))

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
            for name, _, header in _managed_under(self.config.prefix):
                if name not in found:  # created, never handed over (its creator died in between)
                    found[name] = ManagedBlock(name, KIND_NAMES[header.kind], header.size, header.creator.pid)
            return sorted(found.values())

    def release(self, name: str) -> None:
        """Remove one block (the standard library's ``release_segment``)."""
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
                for name, inode, _ in _managed_under(self.config.prefix):
                    _remove(name, inode)

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
        "track_segment", "release_segment", "list_segments", "shmem_session", "shmem_blocks",
    ]

    stop_event: threading.Event  # made by serve_forever

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _next_config, _serving
        super().__init__(*args, **kwargs)
        config, _next_config = _next_config or _new_config(None), None
        self.owned = _serving = _Owned(config)

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
        config = self.owned.config
        return config.prefix, config.handover.hex(), config.token.hex()

    def shmem_blocks(self, c: Any) -> List[Tuple[str, str, int, Optional[int]]]:
        return [tuple(block) for block in self.owned.blocks()]  # type: ignore[misc]

    def track_segment(self, c: Any, segment_name: str) -> None:
        self.owned.adopt(segment_name)

    def release_segment(self, c: Any, segment_name: str) -> None:
        self.owned.release(segment_name)

    def list_segments(self, c: Any) -> List[str]:
        return [block.name for block in self.owned.blocks()]


# ===================================================================== the client side


class _Channel:
    """This process's hand-over connection to one manager."""

    def __init__(self, config: _Config, address: object) -> None:
        self.prefix = config.prefix
        self.address = address
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A manager that is alive but takes nothing (stopped?) fails the send after this.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(CALL_TIMEOUT))
            self.sock.connect(config.handover)
            self.sock.sendmsg([_HELLO + config.token])
        except OSError as err:
            self.sock.close()
            raise _unavailable(address, _GONE) from err

    def new_name(self) -> str:
        return self.prefix + secrets.token_hex(4)

    def hand_over(self, name: str) -> None:
        """Give the manager a descriptor of block ``name`` holding the users lock."""
        try:
            opened = _platform.open_existing(name, writable=False)
        except FileNotFoundError:
            return  # someone removed it already: there is nothing left to own
        try:
            _platform.lock_shared(opened.fd, _lifecycle.USERS_LOCK)
            message = [name.encode("utf-8", "surrogateescape")]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [opened.fd]))]
            deadline = time.monotonic() + CALL_TIMEOUT
            while True:
                try:
                    self.sock.sendmsg(message, rights)
                    return
                except OSError as err:
                    if err.errno == errno.ETOOMANYREFS and time.monotonic() < deadline:
                        time.sleep(0.001)  # too many descriptors in flight: let the manager catch up
                        continue
                    if err.errno in (errno.EAGAIN, errno.ETOOMANYREFS):
                        cause = f"took no block for {CALL_TIMEOUT:g} s (is its process stopped?)"
                        raise _unavailable(self.address, cause, errno.ETIMEDOUT) from err
                    raise _unavailable(self.address, _GONE) from err
        finally:
            os.close(opened.fd)

    def close(self) -> None:
        self.sock.close()


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def _call(
    address: Any, authkey: bytes, serializer: str, method: str, *args: Any, timeout: float = CALL_TIMEOUT
) -> Any:
    """``managers.dispatch`` over a connection that gives up after ``timeout``
    seconds of silence instead of waiting forever."""
    if serializer != "pickle":  # xmlrpclib: the standard library's client, without a timeout
        conn = managers.listener_client[serializer][1](address, authkey=authkey)  # type: ignore[attr-defined]
        try:
            return managers.dispatch(conn, None, method, args)  # type: ignore[attr-defined]
        finally:
            conn.close()
    family = connection.address_type(address)  # type: ignore[attr-defined]
    sock = socket.socket(getattr(socket, family))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        sock.connect(address)
        conn = connection.Connection(sock.detach())
    except OSError as err:
        sock.close()
        raise _unavailable(address, _GONE) from err
    try:
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
        return managers.dispatch(conn, None, method, args)  # type: ignore[attr-defined]
    except (BlockingIOError, TimeoutError) as err:
        cause = f"did not answer within {timeout:g} s (is its process stopped?)"
        raise _unavailable(address, cause, errno.ETIMEDOUT) from err
    except (EOFError, ConnectionError) as err:
        raise _unavailable(address, "went away during the call: its process was killed") from err
    finally:
        conn.close()


def _finalize_manager(
    process: Any, address: Any, authkey: bytes, serializer: str, state: Any, shutdown_timeout: float, prefix: str
) -> None:
    """``shutdown()``: the standard library's steps, then remove what a killed manager left."""
    if process.is_alive():
        try:
            # Our server answers once its blocks are gone.
            _call(address, authkey, serializer, "shutdown", timeout=SHUTDOWN_TIMEOUT)
        except Exception:
            pass
        process.join(timeout=shutdown_timeout)
        if process.is_alive():
            process.terminate()
            process.join(timeout=shutdown_timeout)
            if process.is_alive():
                process.kill()
                process.join()
    state.value = _State.SHUTDOWN
    try:
        del managers.BaseProxy._address_to_local[address]
    except KeyError:
        pass
    for name, inode, _ in _managed_under(prefix):
        _remove(name, inode)


_channel_lock = threading.Lock()
if hasattr(os, "register_at_fork"):
    def _new_channel_lock() -> None:
        global _channel_lock
        _channel_lock = threading.Lock()  # another thread may have held it at fork

    os.register_at_fork(after_in_child=_new_channel_lock)


class SharedMemoryManager(managers.BaseManager):
    """A process that owns shared memory blocks and removes them all when it
    shuts down, or when the process that started it dies.

    ``SharedMemoryManager(address=None, authkey=None)`` as in the standard
    library; ``start()`` or ``with`` starts it, ``connect()`` attaches to a
    running one (by ``address`` and ``authkey``). Blocks made with
    ``SharedMemory(size)``, ``ShareableList(sequence)``, ``zeros``, ``empty``,
    ``full`` and ``array`` belong to it: they live until it shuts down,
    whichever process made them.
    """

    _Server = SharedMemoryServer
    # BaseManager's own attributes, which typeshed does not declare.
    _address: Any
    _authkey: bytes
    _state: Any
    _serializer: str
    _registry: Dict[str, Any]
    _process: Any
    _Client: Callable[..., Any]

    def __init__(
        self, address: Any = None, authkey: Optional[bytes] = None, serializer: str = "pickle",
        ctx: Optional[BaseContext] = None, *, shutdown_timeout: float = 1.0,
    ) -> None:
        super().__init__(address, authkey, serializer, ctx)
        self._shm_shutdown_timeout = shutdown_timeout
        self._config: Optional[_Config] = None
        self._channel: Optional[_Channel] = None

    # ---- the standard library's life cycle

    def get_server(self) -> SharedMemoryServer:
        if self._state.value != _State.INITIAL:
            if self._state.value == _State.STARTED:
                raise ProcessError("Already started SharedMemoryServer")
            if self._state.value == _State.SHUTDOWN:
                raise ProcessError("SharedMemoryManager has shut down")
            raise ProcessError(f"Unknown state {self._state.value!r}")
        return self._Server(self._registry, self._address, self._authkey, self._serializer)

    def start(self, initializer: Optional[Callable[..., object]] = None, initargs: Iterable[Any] = ()) -> None:
        """Start the manager process (ProcessError if it was started before)."""
        if self._state.value != _State.INITIAL:
            super().start(initializer, initargs)  # raises the standard library's ProcessError
            return
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        config = _new_config(_platform.current_process())
        super().start(_ServerSetup(config, initializer), initargs)
        self._config = config
        # The standard library's finalizer, with a timeout on its call and the
        # removal of whatever a killed manager left under its prefix.
        self.shutdown.cancel()
        self.shutdown = util.Finalize(
            self, _finalize_manager,
            args=(self._process, self._address, self._authkey, self._serializer, self._state,
                  self._shm_shutdown_timeout, config.prefix),
            exitpriority=0,
        )

    @classmethod
    def _run_server(cls, *args: Any, **kwargs: Any) -> None:
        # The manager process's main: whatever ends it - shutdown, its parent's death,
        # SIGTERM even before it serves - its blocks are removed on the way out.
        try:
            super()._run_server(*args, **kwargs)  # type: ignore[misc]
        finally:
            if _serving is not None:
                _serving.remove_all()

    # ---- blocks

    def SharedMemory(self, size: int) -> SharedMemory:
        """A new ``shmem.SharedMemory`` block of ``size`` bytes, owned by the manager."""
        return self._new_block(
            lambda name: SharedMemory._typed(name, True, size, track=True, flags=FLAG_MANAGED), _undo_raw
        )

    def ShareableList(self, sequence: Optional[Iterable[Any]]) -> ShareableList:
        """A new ``shmem.ShareableList`` holding ``sequence``, owned by the manager."""
        items = sequence if sequence is not None else ()
        return self._new_block(lambda name: ShareableList._make(items, name=name, track=True, flags=FLAG_MANAGED),
                               _undo_list)

    def empty(self, shape: Any, dtype: Any = float, *, order: str = "C") -> SharedArray:
        """``shmem.empty`` in a block owned by the manager."""
        from . import _array

        return self._new_block(
            lambda name: _array._create(shape, dtype, order, name, True, flags=FLAG_MANAGED), _undo_array
        )

    def zeros(self, shape: Any, dtype: Any = float, *, order: str = "C") -> SharedArray:
        """``shmem.zeros`` in a block owned by the manager."""
        from . import _array

        return self._new_block(
            lambda name: _array._create(shape, dtype, order, name, True, flags=FLAG_MANAGED), _undo_array
        )

    def full(self, shape: Any, fill_value: Any, dtype: Any = None, *, order: str = "C") -> SharedArray:
        """``shmem.full`` in a block owned by the manager."""
        from . import _array

        return self._new_block(
            lambda name: _array._full(shape, fill_value, dtype, order, name, True, FLAG_MANAGED), _undo_array
        )

    def array(self, obj: Any, dtype: Any = None, *, order: str = "K") -> SharedArray:
        """``shmem.array`` (a copy of ``obj``) in a block owned by the manager."""
        from . import _array

        return self._new_block(
            lambda name: _array._array(obj, dtype, order, name, True, FLAG_MANAGED), _undo_array
        )

    def blocks(self) -> List[ManagedBlock]:
        """What the manager owns now, sorted by name: every block it would remove
        if it shut down now (blocks someone unlinked are no longer its own)."""
        self._check_usable()
        return [ManagedBlock(*block) for block in self._call("shmem_blocks")]

    # ---- plumbing

    def _new_block(self, make: Callable[[str], _T], undo: Callable[[_T], None]) -> _T:
        channel = self._channel_for_this_process()
        while True:
            name = channel.new_name()
            try:
                made = make(name)
            except SegmentExists:
                continue  # a generated name collided: draw another
            break
        try:
            channel.hand_over(name)
        except BaseException:
            undo(made)  # ours, and nobody else knows its name yet
            raise
        return made

    def _channel_for_this_process(self) -> _Channel:
        channel = self._channel
        if channel is not None and channel.pid == os.getpid() and self._state.value == _State.STARTED:
            return channel
        with _channel_lock:
            self._check_usable()
            channel = self._channel
            if channel is not None and channel.pid == os.getpid():
                return channel
            if channel is not None:
                channel.close()  # inherited through fork: the parent keeps its own
            if self._config is None:  # connected, or only given the address: ask the manager, once
                prefix, handover, token = self._call("shmem_session")
                self._config = _Config(prefix, bytes.fromhex(handover), bytes.fromhex(token), None)
            self._channel = _Channel(self._config, self._address)
            return self._channel

    def _check_usable(self) -> None:
        if self._state.value == _State.SHUTDOWN:
            raise _unavailable(self._address, "has shut down", errno.ENOENT)
        if self._address is None:
            raise ManagerNotStarted(
                "this SharedMemoryManager was never started: call start() or use `with SharedMemoryManager() "
                "as smm:`, or give the address (and authkey) of a running one"
            )

    def _call(self, method: str, *args: Any) -> Any:
        return _call(self._address, bytes(self._authkey), self._serializer, method, *args)


def _undo_raw(shm: SharedMemory) -> None:
    shm.close()
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def _undo_list(sl: ShareableList) -> None:
    sl.close()
    try:
        sl.unlink()
    except FileNotFoundError:
        pass


def _undo_array(arr: SharedArray) -> None:
    try:
        arr.unlink()
    except FileNotFoundError:
        pass


# Pickled by reference under spawn (BaseManager.start sends type(self)._run_server):
# the public module, which always has it.
SharedMemoryManager.__module__ = "shmem.managers"
for _public in (SharedMemoryServer, ManagedBlock, ManagerNotStarted, ManagerUnavailable):
    _public.__module__ = "shmem.managers"
