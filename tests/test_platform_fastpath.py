"""The attach path's system calls in C (``shmem._platform._fastpath``, issue 10):
required under CI, and the same answers as their pure-Python twins in
``_platform._linux`` for every kind of file a name can lead to.

* ``SHMEM_REQUIRE_SPEEDUPS=1``: the module is in use, and without a usable
  build shmem refuses to import (a user without a compiler gets the twins).
* ``open_block``, ``identity`` and ``close_if``, each called through C and
  through Python on: a block, a block removed while open, a FIFO, a Unix
  socket, a directory, a symlink, a missing name, a descriptor closed or
  reused by another file. The two give equal results or the same exception.
* A signal whose handler raises ends a wait for the users lock on the C path
  with the handler's exception and no descriptor left open.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import threading
import time
from typing import Any, Callable, Iterator, List, Tuple

import pytest
from conftest import PYTHON, SHM_DIR

import shmem
from shmem._core.lifecycle import USERS_LOCK
from shmem._platform import _linux

needs_c = pytest.mark.skipif(_linux._fastpath is None, reason="shmem._platform._fastpath is not in use")

RO = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def test_the_c_path_is_in_use_when_required() -> None:
    if not _linux.SPEEDUPS_REQUIRED:
        pytest.skip("SHMEM_REQUIRE_SPEEDUPS is not set (or SHMEM_PURE_PYTHON is)")
    assert _linux.ACCELERATED and _linux._fastpath is not None
    assert _linux._open_block_fast is _linux._fastpath.open_block


@pytest.mark.parametrize("variable", ["missing", "stale"])
def test_require_speedups_makes_a_missing_build_an_import_error(variable: str) -> None:
    import subprocess

    hide = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'shmem._platform._fastpath':\n"
        "            raise ImportError('not built')\n"
        "sys.meta_path.insert(0, Hide())\n"
        if variable == "missing"
        else "import sys, types\nsys.modules['shmem._platform._fastpath'] = types.ModuleType('stale')\n"
    )
    code = hide + "import shmem\nfrom shmem._platform import _linux\nprint(_linux.ACCELERATED)"

    def run(**env: str) -> Any:
        env = {**os.environ, **env}
        return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, env=env)

    required = run(SHMEM_REQUIRE_SPEEDUPS="1", SHMEM_PURE_PYTHON="")
    assert required.returncode != 0 and "ImportError: SHMEM_REQUIRE_SPEEDUPS is set" in required.stderr
    fallback = run(SHMEM_REQUIRE_SPEEDUPS="", SHMEM_PURE_PYTHON="")
    assert fallback.returncode == 0 and fallback.stdout.strip() == "False", fallback.stderr


# ---------------------------------------------------------------- the twins agree


@pytest.fixture
def planted(shm_name: Callable[[], str]) -> Iterator[Callable[[str], str]]:
    """Make a file of a given kind directly in /dev/shm under this test's prefix; removed after."""
    made: List[str] = []
    servers: List[socket.socket] = []

    def plant(kind: str) -> str:
        name = shm_name()
        path = os.path.join(SHM_DIR, name)
        if kind == "fifo":
            os.mkfifo(path, 0o600)
        elif kind == "socket":
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(path)
            servers.append(server)
        elif kind == "dir":
            os.mkdir(path, 0o700)
        elif kind == "symlink":
            os.symlink("/etc/hostname", path)
        elif kind == "file":
            with open(path, "wb") as f:
                f.write(b"x" * 100)
        made.append(path)
        return name

    yield plant
    for server in servers:
        server.close()
    for path in made:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)


def _answer(call: Callable[[], Any]) -> Tuple[str, Any]:
    """What ``call`` gives: ('ok', value) or ('raise', (type, errno))."""
    try:
        return "ok", call()
    except OSError as err:
        return "raise", (type(err), err.errno)


def _comparable(result: Tuple[str, Any]) -> Tuple[str, Any]:
    """Descriptors differ between two opens: close them and compare the rest."""
    kind, value = result
    if kind == "ok":
        os.close(value[0])
        return kind, tuple(v for i, v in enumerate(value) if i not in (0, 3))  # fd; mtime is a float either way
    return result


@needs_c
@pytest.mark.parametrize("kind", ["file", "fifo", "socket", "dir", "symlink", "missing"])
@pytest.mark.parametrize("lock", [-1, USERS_LOCK])
def test_open_block_gives_what_its_python_twin_gives(
    planted: Callable[[str], str], shm_name: Callable[[], str], kind: str, lock: int
) -> None:
    name = planted(kind) if kind != "missing" else shm_name()
    path = os.path.join(SHM_DIR, name)
    fast = _comparable(_answer(lambda: _linux._fastpath.open_block(path, RO, lock)))
    slow = _comparable(_answer(lambda: _linux._open_block_python(path, RO, lock)))
    assert fast == slow
    # And through the platform layer, the shmem error both paths give:
    if kind != "file":
        with pytest.raises(OSError) as caught:
            _linux.open_locked(name, USERS_LOCK) if lock >= 0 else _linux.open_existing(name, writable=False)
        assert isinstance(caught.value, (shmem.UnsafeSegment, shmem.SegmentNotFound, PermissionError))


@needs_c
def test_a_removed_block_is_told_by_its_link_count_on_both_paths(shm_name: Callable[[], str]) -> None:
    block = shmem.SharedMemory(create=True, size=4096, name=shm_name())
    try:
        path = os.path.join(SHM_DIR, block.name)
        fds = [os.open(path, RO), os.open(path, RO)]
    finally:
        block.close()
        block.unlink()
    try:
        for fd in fds:
            assert os.fstat(fd).st_nlink == 0
        fast, slow = _linux._fastpath.identity(fds[0]), _linux._identity_python(fds[1])
        assert fast == slow and fast is not None and fast[3] == 0
    finally:
        for fd in fds:
            os.close(fd)


@needs_c
def test_identity_and_close_if_refuse_a_descriptor_that_now_holds_another_file(
    tmp_path: Any, shm_name: Callable[[], str]
) -> None:
    block = shmem.SharedMemory(create=True, size=4096, name=shm_name())
    try:
        path = os.path.join(SHM_DIR, block.name)
        fd = os.open(path, RO)
        inode = os.fstat(fd).st_ino
        device = os.stat(SHM_DIR).st_dev
        assert _linux._fastpath.identity(fd) == _linux._identity_python(fd)
        os.close(fd)  # as os.closerange() would; then the number goes to an unrelated file
        other = os.open(tmp_path / "log", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            if other == fd:
                assert _linux._fastpath.close_if(fd, inode, device) is False
                assert _linux._close_if_python(fd, inode, device) is False
                os.fstat(other)  # still open: neither closed it
        finally:
            os.close(other)
        assert _linux._fastpath.identity(fd) is None and _linux._identity_python(fd) is None
        assert _linux._fastpath.close_if(fd, inode, device) is False
        fd = os.open(path, RO)
        assert _linux._fastpath.close_if(fd, inode, device) is True
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF
    finally:
        block.close()
        block.unlink()


@needs_c
def test_a_raising_signal_handler_ends_the_lock_wait_with_no_descriptor_left(shm_name: Callable[[], str]) -> None:
    block = shmem.SharedMemory(create=True, size=4096, name=shm_name(), track=False)  # no users lock held
    path = os.path.join(SHM_DIR, block.name)
    holder = os.open(path, os.O_RDWR)
    try:
        assert _linux.try_lock_exclusive(holder, USERS_LOCK)
        before = set(os.listdir("/proc/self/fd"))

        class Interrupted(Exception):
            pass

        def handler(signum: int, frame: Any) -> None:
            raise Interrupted

        previous = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            started = time.monotonic()
            with pytest.raises(Interrupted):
                _linux._fastpath.open_block(path, RO, USERS_LOCK)
            assert time.monotonic() - started < 30  # a safety net, not a timing assertion
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert set(os.listdir("/proc/self/fd")) <= before
        # A handler that returns: the wait goes on, and ends when the lock is free.
        signal.signal(signal.SIGALRM, lambda *a: None)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
            threading.Timer(0.5, os.close, (holder,)).start()
            opened = _linux._fastpath.open_block(path, RO, USERS_LOCK)
            holder = -1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert len(opened) == 6 and stat.S_ISREG(os.fstat(opened[0]).st_mode)
        os.close(opened[0])
    finally:
        if holder >= 0:
            os.close(holder)
        block.close()
        block.unlink()
