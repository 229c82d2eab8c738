"""``Queue.fileno()``: a pipe that is readable while the queue holds an item, for ``selectors``.

A queue's state lives in shared memory, which no file descriptor can watch.
So the first ``fileno()`` call of a handle starts one watcher thread for it,
which sleeps on the queue's ``seq_watch`` futex word (``queue_layout``) -
producers and emptying consumers wake it, and only when a watcher sleeps
there - and keeps one byte in a pipe while the queue holds an item, none
while it is empty. A selector (or ``loop.add_reader``) waits on the pipe's
read end.

Readable means "an item may be there", as with any descriptor several readers
share: another consumer may take it first, so read with ``get_nowait()`` and
expect ``queue.Empty``. The thread sleeps in the kernel (a 50 ms slice at a
time, as a blocked ``get`` does) and goes with ``close()``.

The watcher writes and reads its pipe only while the descriptor is still that
pipe (checked by inode): after ``os.closerange()`` took the numbers, it stops
instead of touching whatever file has them now, and the next ``fileno()``
makes a new pipe. A forked child's first ``fileno()`` does the same (the
parent's thread did not come along).
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any, Optional, Tuple

from .sync_wait import SLICE_NS


class Watcher:
    """The pipe and thread behind one queue handle's ``fileno()``."""

    def __init__(self, core: Any, name: str) -> None:
        self._core = core
        self._pid = os.getpid()
        self._stopping = False
        self._read_fd, self._write_fd = os.pipe()  # not inherited by exec'd programs (PEP 446)
        found = os.fstat(self._read_fd)
        self._pipe = (found.st_dev, found.st_ino)  # both ends of a pipe are one inode
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._thread: Optional[threading.Thread] = threading.Thread(
            target=self._run, name=f"shmem queue watcher {name}", daemon=True
        )
        self._thread.start()

    def fileno(self) -> int:
        return self._read_fd

    def usable(self) -> bool:
        """Still watching, in this process, through a pipe that is still ours."""
        return (
            self._pid == os.getpid()
            and self._thread is not None
            and self._thread.is_alive()
            and self._ours(self._read_fd)
        )

    def _ours(self, fd: int) -> bool:
        try:
            found = os.fstat(fd)
        except OSError:
            return False
        return stat.S_ISFIFO(found.st_mode) and (found.st_dev, found.st_ino) == self._pipe

    def _run(self) -> None:
        known = False
        while not self._stopping:
            try:
                nonempty = bool(self._core.watch(known, SLICE_NS))
            except ValueError:  # the queue was closed under the thread
                return
            if nonempty == known or self._stopping:
                continue
            fd = self._write_fd if nonempty else self._read_fd
            if not self._ours(fd):  # os.closerange(): the number may be another file's now
                return
            try:
                if nonempty:
                    os.write(fd, b"\0")
                else:
                    os.read(fd, 64)
            except BlockingIOError:  # a byte there already / none to take: as wanted
                pass
            except OSError:
                return
            known = nonempty

    def stop(self) -> None:
        """Stop the thread (it is out of the queue's memory when this returns) and close the pipe."""
        self._stopping = True
        thread, self._thread = self._thread, None
        if thread is not None and self._pid == os.getpid():
            try:
                self._core.wake_watchers()
            except ValueError:
                pass
            if thread is not threading.current_thread():
                thread.join()  # at most one slice: watch() sleeps no longer
        fds: Tuple[int, int] = (self._read_fd, self._write_fd)
        self._read_fd = self._write_fd = -1
        for fd in fds:
            if fd >= 0 and self._ours(fd):  # after os.closerange() the number may be another file's
                os.close(fd)


__all__ = ["Watcher"]
