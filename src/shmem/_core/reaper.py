"""The reaper: the process that removes a process tree's blocks after their creators are gone.

Started by ``tracking`` with a listening Unix socket as its stdin; the
protocol is drawn there, and coded here (``encode``/``decode``). It keeps,
per connected process (known by SO_PEERCRED), the blocks that process
created and did not unlink, and a pidfd that becomes
readable when the process exits - however it exits, SIGKILL included. Then
it reads what is left on that process's connections, and applies the
lifecycle rule (``lifecycle.remove_if_abandoned``) to each of its blocks.
Blocks somebody still holds open are handed to a thread that sleeps in the
kernel until their last user lets go (``_Waiters``).

Idle, it sleeps in ``poll()`` with no timeout: no wake-ups until a process
connects, sends, or dies. While processes are creating blocks it reads at
most every ``BATCH_SECONDS``, so a burst of creates costs one wake-up, not
one per message. It exits once no process is connected and no block is
left to look after - after accepting every connection still queued, so a
process that connected in that moment is never left without a reaper (it
gets no greeting, sees the connection close, and starts another).

It prints nothing, runs in a process group of its own, ignores SIGINT,
SIGTERM and SIGHUP (so Ctrl-C or a kill of the application's process group
does not stop the cleanup that should follow), and keeps to the modules it
needs, so it stays as small as an interpreter allows. SIGKILL still stops
it: its clients start another at their next create, unlink or exit, and
``gc()`` is the fallback for blocks whose creators died with it.
"""

from __future__ import annotations

import _thread
import os
import select
import signal
import socket
import struct
import time
from typing import Dict, List, Optional, Set, Tuple

from .. import _platform
from .lifecycle import POLL_SECONDS, USERS_LOCK, Verdict, remove_if_abandoned

# Reads are at most this often while messages keep coming.
# Each queued message costs the sender ~700 bytes of socket buffer (one skb); with the
# common 208 KiB cap (net.core.wmem_max, doubled) 10 ms of the fastest creates fit.
BATCH_SECONDS = 0.01
# How often a creator without a pidfd (no kernel support, another pid namespace) is looked at.
LIVENESS_SECONDS = 1.0
# Signals aimed at the application that must not stop the cleanup after it.
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A connection that sends a line longer than this is not a shmem client.
_MAX_LINE = 1024


# ------------------------------------------------------------ the protocol


def encode(sign: bytes, name: str, block_id: int) -> bytes:
    return b"%s %016x %s\n" % (sign, block_id, name.encode("utf-8", "surrogateescape").hex().encode())


def decode(line: bytes) -> Tuple[bytes, int, str]:
    """(sign, block_id, name) of one line; ValueError for anything malformed."""
    sign, block_id, name = line.split()
    if sign not in (b"+", b"-") or len(block_id) != 16:
        raise ValueError("not a tracking message")
    return sign, int(block_id, 16), bytes.fromhex(name.decode("ascii")).decode("utf-8", "surrogateescape")


# ------------------------------------------------------------ the reaper process


class _Creator:
    """A process that connected, and the tracked blocks it made."""

    def __init__(self, pid: int, pidfd: Optional[int]) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.blocks: Dict[int, str] = {}
        self.connections: Set[int] = set()
        self.identity = None if pid <= 0 else _identity(pid)


def _identity(pid: int) -> Optional[_platform.ProcessIdentity]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return _platform.ProcessIdentity(pid, int(fields[19]), _platform.current_process().pid_namespace)
    except (OSError, IndexError, ValueError):
        return None


class _Waiters:
    """Threads that sleep in the kernel until the last user of a block lets go.

    A block whose creator died while others still hold it open waits here:
    one thread per block asks for the exclusive users lock and blocks
    (F_OFD_SETLKW) until every shared lock is gone - a holder closing it,
    exiting or being killed - then drops it at once and names the block on a
    pipe, and the main loop applies the rule again. No polling, and removal
    follows the last user within a wake-up. (A waiting exclusive request does
    not hold back new shared locks: an attacher arriving meanwhile gets in,
    and the rule then finds the block held open again.)
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._waiting: Set[int] = set()

    def fileno(self) -> int:
        return self._read

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._waiting

    def start(self, name: str, block_id: int) -> None:
        try:
            opened = _platform.open_existing(name)
        except (OSError, ValueError):
            return  # gone meanwhile: the next look finds it gone
        self._waiting.add(block_id)
        _thread.start_new_thread(self._wait, (opened.fd, block_id))

    def _wait(self, fd: int, block_id: int) -> None:
        try:
            _platform.lock_exclusive(fd, USERS_LOCK)
        except OSError:
            pass
        finally:
            os.close(fd)  # the main loop takes the lock again, to remove the block under it
            os.write(self._write, _BLOCK_ID.pack(block_id))

    def collect(self) -> None:
        try:
            data = os.read(self._read, 1 << 16)
        except BlockingIOError:
            return
        for (block_id,) in _BLOCK_ID.iter_unpack(data[: len(data) - len(data) % _BLOCK_ID.size]):
            self._waiting.discard(block_id)


_BLOCK_ID = struct.Struct("=Q")


class Reaper:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.poller = select.poll()
        self.poller.register(listener.fileno(), select.POLLIN)
        self.connections: Dict[int, socket.socket] = {}
        self.owner: Dict[int, _Creator] = {}  # connection fd -> its process
        self.partial: Dict[int, bytes] = {}
        self.creators: Dict[int, _Creator] = {}  # pid -> creator
        self.by_pidfd: Dict[int, _Creator] = {}
        self.pending: Dict[int, str] = {}  # blocks whose creator died but that are still held open
        self.waiters = _Waiters()
        self.poller.register(self.waiters.fileno(), select.POLLIN)
        self.next_poll = 0.0

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        self.accept_all()
        while True:
            if not self.connections and not self.pending and not any(c.blocks for c in self.creators.values()):
                if not self.accept_all():  # nobody queued either: done
                    return
                continue
            events = self.poller.poll(self.timeout_ms())
            busy = False
            for fd, _ in events:
                if fd == self.listener.fileno():
                    self.accept_all()
                elif fd == self.waiters.fileno():
                    self.waiters.collect()
                    self.recheck()
                elif fd in self.connections:
                    self.read(fd)
                    busy = True
                elif fd in self.by_pidfd:
                    self.died(self.by_pidfd[fd])
            self.check_without_pidfd()
            if self.polled() and time.monotonic() >= self.next_poll:
                self.recheck()
            if busy:
                time.sleep(BATCH_SECONDS)  # let a burst of messages gather: one wake-up for many

    def polled(self) -> bool:
        """Whether some pending block has no lock waiter (its creator's liveness is
        unknown here: another pid namespace), so it is looked at periodically."""
        return any(block_id not in self.waiters for block_id in self.pending)

    def timeout_ms(self) -> Optional[int]:
        waits: List[float] = []
        if self.polled():
            waits.append(max(0.0, self.next_poll - time.monotonic()))
        if any(c.pidfd is None and c.blocks for c in self.creators.values()):
            waits.append(LIVENESS_SECONDS)
        return None if not waits else int(min(waits) * 1000) + 1

    # ------------------------------------------------------------ connections

    def accept_all(self) -> bool:
        accepted = False
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError:  # out of descriptors, say: try again on the next wake-up
                return accepted
            accepted = True
            pid, uid = _platform.peer(conn)
            if uid != os.geteuid():
                conn.close()
                continue
            try:
                conn.sendall(b"shmem-reaper %d\n" % os.getpid(), socket.MSG_NOSIGNAL)
            except OSError:
                pass  # the client is gone already: what it sent before it died still counts
            conn.setblocking(False)
            fd = conn.fileno()
            creator = self.creator(pid)
            self.connections[fd] = conn
            self.owner[fd] = creator
            creator.connections.add(fd)
            self.poller.register(fd, select.POLLIN)

    def creator(self, pid: int) -> _Creator:
        creator = self.creators.get(pid)
        if creator is None:
            try:
                pidfd = _platform.watch_process(pid)
            except ProcessLookupError:
                pidfd = None  # already gone: check_without_pidfd finds out
            creator = self.creators[pid] = _Creator(pid, pidfd)
            if pidfd is not None:
                self.by_pidfd[pidfd] = creator
                self.poller.register(pidfd, select.POLLIN)
        return creator

    def read(self, fd: int) -> None:
        conn, creator = self.connections[fd], self.owner[fd]
        data = self.partial.pop(fd, b"")
        closed = False
        while True:
            try:
                chunk = conn.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
        *lines, rest = data.split(b"\n")
        for line in lines:
            try:
                sign, block_id, name = decode(line)
            except ValueError:
                continue  # "." (a liveness check) or garbage
            if sign == b"+":
                creator.blocks[block_id] = name
            else:
                creator.blocks.pop(block_id, None)
        if len(rest) > _MAX_LINE:
            closed = True
        if closed:
            self.drop_connection(fd)
        elif rest:
            self.partial[fd] = rest

    def drop_connection(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.connections.pop(fd).close()
        self.partial.pop(fd, None)
        creator = self.owner.pop(fd)
        creator.connections.discard(fd)
        # A process that closed its connection but lives on (it may have closed every
        # descriptor, daemonizing) keeps its record: its pidfd still tells its death.
        if not creator.connections and not creator.blocks:
            self.forget(creator)

    def forget(self, creator: _Creator) -> None:
        if self.creators.get(creator.pid) is creator:
            del self.creators[creator.pid]
        if creator.pidfd is not None:
            self.poller.unregister(creator.pidfd)
            del self.by_pidfd[creator.pidfd]
            os.close(creator.pidfd)
            creator.pidfd = None

    # ------------------------------------------------------------ deaths

    def died(self, creator: _Creator) -> None:
        for fd in list(creator.connections):
            self.read(fd)  # what it sent before it died
            if fd in self.connections:
                self.drop_connection(fd)
        self.forget(creator)
        for block_id, name in creator.blocks.items():
            self.pending[block_id] = name
        creator.blocks.clear()
        self.recheck()

    def check_without_pidfd(self) -> None:
        for creator in list(self.creators.values()):
            if creator.pidfd is None and creator.blocks:
                if creator.identity is None or _platform.process_alive(creator.identity) is False:
                    self.died(creator)

    def recheck(self) -> None:
        for block_id, name in list(self.pending.items()):
            if block_id in self.waiters:
                continue  # a thread waits for its last user; it tells us when
            try:
                verdict, _ = remove_if_abandoned(name, block_id)
            except Exception:  # never loop forever on a block we cannot handle
                verdict = Verdict.FOREIGN
            if verdict is Verdict.HELD_OPEN:
                self.waiters.start(name, block_id)
            elif verdict is not Verdict.IN_USE:
                del self.pending[block_id]
        self.next_poll = time.monotonic() + POLL_SECONDS


def main() -> None:
    # Signals aimed at the application must not stop the cleanup that follows
    # them (our own process group already keeps terminal and group signals away).
    # They arrive blocked (tracking spawns us with them masked, so one sent while
    # this interpreter starts stays pending); ignoring a pending signal discards it.
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, IGNORED_SIGNALS)
    os.closerange(3, 1 << 16)  # inheritable descriptors of the creator are not ours to keep open
    listener = socket.socket(fileno=0)
    listener.setblocking(False)
    Reaper(listener).run()
