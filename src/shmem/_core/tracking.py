"""How a process tells its reaper which blocks it created (the client side).

One reaper serves a whole process tree. Importing shmem puts a random token
in the environment (``SHMEM_REAPER``) unless one is there; children - forked,
spawned, or started by subprocess - inherit it. The first process of the tree
that creates a tracked block starts the reaper, listening on a Unix socket
whose abstract address the token names (``_platform.reaper_address``); the
others connect to it. Protocol,
one line per message, names hex-encoded so any name stays on one line::

    + <block_id:16 hex> <name hex>     this process made this tracked block
    - <block_id:16 hex> <name hex>     this process unlinked it (sent with the next +)
    .                                  nothing (checks that the reaper is there)

The reaper learns who sent a line from the socket (SO_PEERCRED), not from
the line. After connecting, a client that did not start the reaper itself
waits for its greeting, ``shmem-reaper <pid>``: a reaper that was about to
exit closes the connection instead, and the client starts a new one.

Hostile conditions this module is written for:

* **Signal handlers.** A handler may create or unlink a block while the main
  thread is inside ``track``/``untrack``. The common path takes no lock: one
  dict update and one ``send`` of a message short enough to be queued whole.
  Only reconnecting takes a (re-entrant) lock; a handler that interrupts a
  reconnect of its own thread records its block and returns, and the
  interrupted reconnect sends every recorded block once it is connected.
* **Reused descriptors.** Code that daemonizes closes every descriptor
  (``os.closerange``), and the next file it opens gets our socket's number.
  Before each send the descriptor's identity (device, inode) is compared with
  the socket's; a stranger is never written to, never closed - the socket
  object is detached from it - and a new connection takes over.
* **A killed reaper.** Sending uses MSG_NOSIGNAL: a dead peer is EPIPE, never
  SIGPIPE. The client starts a new reaper and sends it every block it tracks.
* **fork.** A child shares no blocks with its parent's record and must not
  use its parent's connection (the reaper knows a connection by the process
  that made it): it drops both and connects on its first tracked create.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

from .. import _platform
from .._errors import ShmemError
from .forks import reset_in_child
from .reaper import IGNORED_SIGNALS, encode

#: The environment variable that names this process tree's reaper.
ENV = "SHMEM_REAPER"

# "-" lines are sent at the latest when this many wait (well under the size
# that one send queues whole).
_UNLINKED_BATCH = 16
# How long a client waits for an existing reaper's greeting.
_GREETING_SECONDS = 5.0


class _Connection(NamedTuple):
    sock: socket.socket
    identity: Tuple[int, int]  # (device, inode) of the socket, to recognise its descriptor
    pid: int  # the process that connected (a forked child must not use it)
    reaper_pid: Optional[int]  # None until the greeting was read


def _reaper_argv() -> List[str]:
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # -I -S: no user site, no site-packages, no PYTHON* variables: a small,
    # predictable interpreter. The stub package skips shmem/__init__.py, which
    # would import every kind of block; the reaper needs only _core and _platform.
    code = (
        "import sys, types; package = types.ModuleType('shmem'); package.__path__ = [sys.argv[1]]; "
        "sys.modules['shmem'] = package; from shmem._core.reaper import main; main()"
    )
    return [sys.executable, "-I", "-S", "-c", code, package_dir]


class _Client:
    """This process's connection to its tree's reaper, made on first use."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._connecting: Optional[int] = None  # the thread inside _reconnect
        self._conn: Optional[_Connection] = None
        self._blocks: Dict[int, str] = {}  # block_id -> name: what we created and still track
        self._unlinked: List[bytes] = []  # "-" lines not sent yet: they ride along with the next "+"
        self._exit_fd: Optional[int] = None  # the connection's descriptor once detached at exit

    # ------------------------------------------------------------ the API

    def track(self, name: str, block_id: int) -> None:
        """Tell the reaper that this process created block ``name``. Raises
        ShmemError if no reaper can be reached or started."""
        self._blocks[block_id] = name
        self._send(self._take_unlinked() + encode(b"+", name, block_id), required=True)

    def untrack(self, name: str, block_id: int) -> None:
        """Tell the reaper that block ``name`` was unlinked. Never raises: the
        block is gone, and a reaper that missed this finds it gone too."""
        if self._blocks.pop(block_id, None) is not None:
            # Not urgent: a reaper that still lists the block finds it gone. Sent with
            # the next "+" (one send per create/unlink cycle instead of two), or in
            # batches, so that the reaper's record of a busy process stays small.
            self._unlinked.append(encode(b"-", name, block_id))
            if len(self._unlinked) >= _UNLINKED_BATCH:
                self._send(self._take_unlinked(), required=False)

    def _take_unlinked(self) -> bytes:
        # Swapped in one step: a "-" a signal handler adds meanwhile lands in the
        # new list and goes with a later message.
        taken, self._unlinked = self._unlinked, []
        return b"".join(taken)

    def reaper_pid(self) -> Optional[int]:
        """The pid of the reaper this process is connected to, or None."""
        conn = self._usable()
        if conn is None:
            return None
        if conn.reaper_pid is None:
            with self._lock:
                pid = _read_greeting(conn.sock)
                if pid is not None and self._conn is conn:
                    self._conn = conn._replace(reaper_pid=pid)
                return pid
        return conn.reaper_pid

    def check_at_exit(self) -> None:
        """If our reaper was killed, start a new one now: it will see us exit and
        remove our blocks, where nobody would otherwise."""
        if self._blocks:
            self._send(self._take_unlinked() + b".\n", required=False)

    def reset_after_fork(self) -> None:
        # The child did not create its parent's blocks; the inherited socket is
        # the parent's connection (the reaper would count us as the parent).
        conn = self._conn
        if conn is not None:
            _discard(conn)
        self.__init__()  # type: ignore[misc]

    # ------------------------------------------------------------ sending

    def _usable(self) -> Optional[_Connection]:
        conn = self._conn
        if conn is None or conn.pid != os.getpid():
            return None
        if _platform.file_identity(conn.sock.fileno()) != conn.identity:
            return None  # closed behind our back, and maybe the number reused
        return conn

    def _send(self, message: bytes, required: bool) -> None:
        if self._exit_fd is not None:
            self._send_at_exit(message)
            return
        conn = self._usable()
        if conn is not None and _platform.send_message(conn.sock, message):
            return
        try:
            self._reconnect(message)
        except ShmemError:
            if required:
                raise

    def _send_at_exit(self, message: bytes) -> None:
        """After _let_go_at_exit (a finalizer closing or unlinking a block during
        shutdown): best effort on the same connection, never a new one - the
        reaper already has every block (check_at_exit) and sees us exit."""
        conn, fd = self._conn, self._exit_fd
        if conn is None or fd is None or _platform.file_identity(fd) != conn.identity:
            return
        sock = socket.socket(fileno=fd)
        try:
            _platform.send_message(sock, message)
        finally:
            sock.detach()

    def _reconnect(self, message: bytes) -> None:
        me = threading.get_ident()
        if self._connecting == me:
            # A signal handler interrupted this thread's own reconnect: the block is
            # in self._blocks, and the reconnect sends every block once connected.
            return
        with self._lock:
            self._connecting = me
            try:
                conn = self._usable()
                if conn is not None and _platform.send_message(conn.sock, message):
                    return  # another thread reconnected while we waited for the lock
                old, self._conn = self._conn, None
                if old is not None:
                    _discard(old)
                for _ in range(3):
                    conn = _connect()
                    self._conn = conn
                    # A snapshot in one step (a handler may add or remove blocks meanwhile:
                    # what it adds after this, it sends itself on the new connection).
                    if all(
                        _platform.send_message(conn.sock, encode(b"+", name, block_id))
                        for block_id, name in list(self._blocks.items())
                    ):
                        return
                    self._conn = None
                    _discard(conn)
                raise ShmemError("shmem's reaper process keeps closing its connection")
            finally:
                self._connecting = None


def _discard(conn: _Connection) -> None:
    """Let go of a connection's socket without ever closing a stranger's descriptor.

    In a forked child the descriptor is the child's own copy of the parent's
    socket: closing it leaves the parent's connection alone, and not closing
    it would leak one descriptor per fork. Only a number that now names
    something else (closed behind our back, then reused) is left open.
    """
    if _platform.file_identity(conn.sock.fileno()) == conn.identity:
        conn.sock.close()
    else:
        conn.sock.detach()


def _connect() -> _Connection:
    """A connection to this tree's reaper, starting the reaper if none runs."""
    token = _tree_token()
    address = _platform.reaper_address(token)
    for _ in range(50):
        sock = _platform.connect(address)
        if sock is not None:
            pid = _read_greeting(sock)
            if pid is not None:
                return _connection(sock, pid)
            sock.close()  # it was exiting: start another under the same address
        listener = _platform.listen(address)
        if listener is None:
            time.sleep(0.01)  # another process of the tree is starting one, or one is exiting
            continue
        try:
            # Connected before the reaper exists: it accepts this connection first
            # thing, so it cannot find nobody connected and exit at once.
            sock = _platform.connect(address)
            if sock is None:
                continue
            try:
                reaper_pid = _platform.spawn_with_stdin(_reaper_argv(), listener.fileno(), IGNORED_SIGNALS)
            except OSError as err:
                sock.close()
                raise ShmemError(f"cannot start shmem's reaper process ({err}); use track=False") from err
        finally:
            listener.close()  # the reaper holds its own copy
        return _connection(sock, reaper_pid)
    raise ShmemError("cannot reach shmem's reaper process; use track=False")


def _connection(sock: socket.socket, reaper_pid: Optional[int]) -> _Connection:
    identity = _platform.file_identity(sock.fileno())
    assert identity is not None
    return _Connection(sock, identity, os.getpid(), reaper_pid)


def _read_greeting(sock: socket.socket) -> Optional[int]:
    """The reaper's pid from its greeting; None if it closed the connection."""
    sock.settimeout(_GREETING_SECONDS)
    try:
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            chunk = sock.recv(64 - len(line))
            if not chunk:
                return None
            line += chunk
    except OSError:
        return None
    finally:
        sock.setblocking(False)
    try:
        word, pid = line.split()
        return int(pid) if word == b"shmem-reaper" else None
    except ValueError:
        return None


def _tree_token() -> str:
    """This process tree's reaper token, made (and inherited by children from now
    on) if there is none."""
    token = os.environ.get(ENV, "")
    if not (token.isalnum() and len(token) <= 64):
        token = os.urandom(8).hex()
        os.environ[ENV] = token
    return token


# Set when shmem is imported, not at the first tracked create: a parent that only
# starts workers (a Pool whose workers create blocks) must hand them one token,
# or each worker would start a reaper of its own.
_tree_token()
_client = _Client()


def _let_go_at_exit() -> None:
    """Detach the reaper connection's socket at exit: the kernel closes it when the
    process is gone, as it always did - the reaper must not hear of our end before
    it happens - and the socket object, collected at shutdown, does not warn
    (ResourceWarning) about the descriptor it leaves open. Never a stranger's."""
    conn = _client._conn
    if conn is not None and conn.pid == os.getpid():
        if _platform.file_identity(conn.sock.fileno()) == conn.identity:
            _client._exit_fd = conn.sock.detach()


atexit.register(_let_go_at_exit)  # registered first, run last (after check_at_exit's last message)
atexit.register(_client.check_at_exit)
reset_in_child(_client.reset_after_fork)

track = _client.track
untrack = _client.untrack
reaper_pid = _client.reaper_pid
