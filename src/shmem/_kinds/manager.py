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
name prefix (``<SHMEM_NAME_PREFIX or shmem_><8 hex>_``) with the header's
manager-owned flag and ``track=True``, then hands the manager a file
descriptor of the block on which it took the users lock
(``manager_server.hold``, ``_core.lifecycle``), over a Unix socket
(SCM_RIGHTS): one ``sendmsg``, no answer awaited. From that
moment the manager is a user of the block - even while the descriptor is still
in flight - so the block outlives its creator, and nothing can remove it but
the manager or an explicit ``unlink()``. (Naming the block in a one-way message
and letting the manager open it would leave a window: a creator killed before
the manager opened it would have its block removed by its reaper. Listing
/dev/shm for the prefix alone would leave that window open for good, and
make a block made by a worker that exits disappear.)

How the manager keeps the blocks it is handed, and removes them all, is the
manager process's side: ``manager_server``, which also holds what both sides
share (``Session``, ``hold``, ``remove_leftovers``).

When something dies
-------------------
The starter's death, Ctrl-C and SIGTERM, as the manager process sees them:
``manager_server``. Here, the client's view:

* The manager process dies: the kernel closes its descriptors, the users locks
  go with them, and each block falls back to the core lifecycle - removed once
  its creator and every process using it are gone (by the process tree's
  reaper, or ``shmem.gc()`` if everything was killed at once). The starting process
  also removes whatever is under the prefix when it shuts the manager down.
  Clients get ``ManagerUnavailable`` (a ConnectionRefusedError and a
  FileNotFoundError, the errors the standard library raises then) naming the
  manager's address: at once when it is gone, after ``CALL_TIMEOUT`` when it
  is alive but does not answer; never a hang.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import threading
import time
from multiprocessing import connection, managers, util
from multiprocessing.context import BaseContext, ProcessError
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, TypeVar, Union

from .. import _platform
from .._core.block import Block
from .._core.forks import reset_in_child
from .._core.header import FLAG_MANAGED
from .._errors import SegmentExists, ShmemError
from . import raw
from .list import ShareableList, create_list
from .manager_server import ManagedBlock, ServerSetup, Session, SharedMemoryServer, hold, remove_leftovers
from .raw import SharedMemory

if TYPE_CHECKING:
    from .array import SharedArray

__all__ = ["ManagedBlock", "ManagerNotStarted", "ManagerUnavailable", "SharedMemoryManager", "SharedMemoryServer"]

#: How long a client waits for a manager that is alive but does not answer.
CALL_TIMEOUT = 5.0
#: ... and for one that is removing its blocks on shutdown (the starter then removes what is left).
SHUTDOWN_TIMEOUT = 30.0

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


def _unavailable(address: object, cause: str, code: int = errno.ECONNREFUSED) -> ManagerUnavailable:
    return ManagerUnavailable(code, f"the SharedMemoryManager {cause}", str(address))


class _Channel:
    """This process's hand-over connection to one manager."""

    def __init__(self, session: Session, address: object) -> None:
        self.session = session
        self.address = address
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A manager that is alive but takes nothing (stopped?) fails the send after this.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(CALL_TIMEOUT))
            self.sock.connect(session.handover)
            self.sock.sendmsg([session.greeting()])
        except OSError as err:
            self.sock.close()
            raise _unavailable(address, _GONE) from err

    def hand_over(self, name: str) -> None:
        """Give the manager a descriptor of block ``name`` holding the users lock."""
        try:
            fd = hold(name)
        except FileNotFoundError:
            return  # someone removed it already: there is nothing left to own
        try:
            message = [name.encode("utf-8", "surrogateescape")]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
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
            os.close(fd)  # sent, the manager holds its own copy (one in flight counts too)

    def close(self) -> None:
        self.sock.close()


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def _call(address: Any, authkey: bytes, serializer: str, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
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
    # As the standard library's finalizer does: forget the proxies' cached connections.
    getattr(managers.BaseProxy, "_address_to_local", {}).pop(address, None)
    remove_leftovers(prefix)


_channel_lock = threading.Lock()


def _new_channel_lock() -> None:
    global _channel_lock
    _channel_lock = threading.Lock()  # another thread may have held it at the fork


reset_in_child(_new_channel_lock)


class SharedMemoryManager(managers.BaseManager):
    """A process that owns shared memory blocks and removes them all when it
    shuts down, or when the process that started it dies.

    ``SharedMemoryManager(address=None, authkey=None)`` as in the standard
    library; ``start()`` or ``with`` starts it, ``connect()`` attaches to a
    running one (by ``address`` and ``authkey``). Blocks made with
    ``SharedMemory(size)``, ``ShareableList(sequence)``, ``zeros``, ``empty``,
    ``full`` and ``array`` belong to it: they live until it shuts down,
    whichever process made them.

    Args:
        address: Where the manager listens; None picks one. Give a running
            manager's ``address`` (and ``authkey``) to ``connect()`` to it.
        authkey: The key clients must present; None uses the current
            process's ``authkey``.
        serializer: ``BaseManager``'s: 'pickle' or 'xmlrpclib'.
        ctx: The multiprocessing context that starts the manager process.
        shutdown_timeout: Seconds ``shutdown()`` waits for the manager
            process to exit after it removed its blocks, before terminating
            it (the standard library's ``BaseManager`` argument of 3.13);
            whatever a killed manager left is removed by ``shutdown()``.

    Creating a block through it raises what creating the block directly
    raises (``shmem.NoSpace``, ``shmem.UnsupportedDtype``, ...), and also
    ``shmem.managers.ManagerUnavailable`` (a ConnectionRefusedError and a
    FileNotFoundError) when the manager was shut down, was killed or does
    not answer, and ``shmem.managers.ManagerNotStarted`` (a ValueError) when
    it was never started nor connected to.
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
        self,
        address: Any = None,
        authkey: Optional[bytes] = None,
        serializer: str = "pickle",
        ctx: Optional[BaseContext] = None,
        *,
        shutdown_timeout: float = 1.0,
    ) -> None:
        super().__init__(address, authkey, serializer, ctx)
        self._shm_shutdown_timeout = shutdown_timeout
        self._session: Optional[Session] = None
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
        """Start the manager process.

        Raises:
            multiprocessing.ProcessError: It was started before, or has shut down.
            TypeError: ``initializer`` is not callable.
        """
        if self._state.value != _State.INITIAL:
            super().start(initializer, initargs)  # raises the standard library's ProcessError
            return
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        session = Session.new(_platform.current_process())
        super().start(ServerSetup(session, initializer), initargs)
        self._session = session
        # The standard library's finalizer, with a timeout on its call and the
        # removal of whatever a killed manager left under its prefix.
        self.shutdown.cancel()
        self.shutdown = util.Finalize(
            self,
            _finalize_manager,
            args=(
                self._process,
                self._address,
                self._authkey,
                self._serializer,
                self._state,
                self._shm_shutdown_timeout,
                session.prefix,
            ),
            exitpriority=0,
        )

    # ---- blocks

    def SharedMemory(self, size: int) -> SharedMemory:
        """A new ``shmem.SharedMemory`` block of ``size`` bytes, owned by the manager."""
        return self._new_block(
            lambda name: raw.wrap(Block.create(name, size, track=True, flags=FLAG_MANAGED)), _undo_handle
        )

    def ShareableList(self, sequence: Optional[Iterable[Any]]) -> ShareableList:
        """A new ``shmem.ShareableList`` holding ``sequence``, owned by the manager."""
        items = sequence if sequence is not None else ()
        return self._new_block(lambda name: create_list(items, name=name, track=True, flags=FLAG_MANAGED), _undo_handle)

    def empty(self, shape: Any, dtype: Any = float, *, order: str = "C") -> SharedArray:
        """``shmem.empty`` in a block owned by the manager."""
        from . import array as arrays

        return self._new_block(
            lambda name: arrays.create_array(shape, dtype, order, name, True, flags=FLAG_MANAGED), _undo_array
        )

    def zeros(self, shape: Any, dtype: Any = float, *, order: str = "C") -> SharedArray:
        """``shmem.zeros`` in a block owned by the manager."""
        from . import array as arrays

        return self._new_block(
            lambda name: arrays.create_array(shape, dtype, order, name, True, flags=FLAG_MANAGED), _undo_array
        )

    def full(self, shape: Any, fill_value: Any, dtype: Any = None, *, order: str = "C") -> SharedArray:
        """``shmem.full`` in a block owned by the manager."""
        from . import array as arrays

        return self._new_block(
            lambda name: arrays.create_full(shape, fill_value, dtype, order, name, True, FLAG_MANAGED), _undo_array
        )

    def array(self, obj: Any, dtype: Any = None, *, order: str = "K") -> SharedArray:
        """``shmem.array`` (a copy of ``obj``) in a block owned by the manager."""
        from . import array as arrays

        return self._new_block(
            lambda name: arrays.create_copy(obj, dtype, order, name, True, FLAG_MANAGED), _undo_array
        )

    def blocks(self) -> List[ManagedBlock]:
        """What the manager owns now, sorted by name: every block it would remove
        if it shut down now (blocks someone unlinked are no longer its own).

        Raises:
            shmem.managers.ManagerUnavailable: The manager was shut down, was
                killed or does not answer.
            shmem.managers.ManagerNotStarted: It was never started nor
                connected to.
        """
        self._check_usable()
        return [ManagedBlock(*block) for block in self._call("shmem_blocks")]

    # ---- plumbing

    def _new_block(self, make: Callable[[str], _T], undo: Callable[[_T], None]) -> _T:
        channel = self._channel_for_this_process()
        while True:
            name = channel.session.new_name()
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
            if self._session is None:  # connected, or only given the address: ask the manager, once
                self._session = Session.from_wire(self._call("shmem_session"))
            self._channel = _Channel(self._session, self._address)
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


def _undo_handle(made: Union[SharedMemory, ShareableList]) -> None:
    made.close()
    try:
        made.unlink()
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
ManagerNotStarted.__module__ = "shmem.managers"
ManagerUnavailable.__module__ = "shmem.managers"
