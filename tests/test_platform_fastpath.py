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
* The create path's ``build``, ``link``, ``open_same`` and ``unlink_same``
  give what their twins give. The platform calls the C functions whatever
  ``os`` holds; a test that replaces an os function selects the twins with the
  ``python_platform`` fixture, and then the replacement sees every call.
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


# ---------------------------------------------------------------- the create path's twins


def _built(result: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """What ``build`` gave, comparable between two calls: the file's mode and
    contents instead of its descriptor and inode (closed after)."""
    if result[0] < 0:
        return tuple(result)
    fd = result[0]
    try:
        st = os.fstat(fd)
        assert st.st_ino == result[1] and st.st_nlink == 0  # unnamed
        return ("file", len(result), stat.S_IMODE(st.st_mode), st.st_size, os.pread(fd, st.st_size, 0))
    finally:
        os.close(fd)


UNNAMED = _linux._CREATE_UNNAMED


@needs_c
@pytest.mark.parametrize("umask", [0o022, 0o277])  # 0o277 takes the owner's write bit: fchmod restores 0600
@pytest.mark.parametrize(
    "pieces",
    [[], [(4096, b"header")], ((0, b"a"), (8000, memoryview(b"tail"))), [(0, bytearray(b"x" * 5000))]],
    ids=["none", "one", "tuple", "bytearray"],
)
def test_build_gives_what_its_python_twin_gives(umask: int, pieces: Any) -> None:
    previous = os.umask(umask)
    try:
        fast = _built(_linux._fastpath.build(SHM_DIR, UNNAMED, 8192, pieces))
        slow = _built(_linux._build_python(SHM_DIR, UNNAMED, 8192, pieces))
    finally:
        os.umask(previous)
    assert fast == slow
    assert fast[2] == 0o600 and fast[3] == 8192


@needs_c
@pytest.mark.parametrize(
    "directory,total,pieces,stage,code",
    [
        ("/nonexistent-shmem-dir", 8192, [], _linux._STAGE_OPEN, errno.ENOENT),
        ("/proc/self/stat", 8192, [], _linux._STAGE_OPEN, errno.ENOTDIR),
        (SHM_DIR, (1 << 63) - 1, [], _linux._STAGE_RESERVE, errno.ENOSPC),  # more than any tmpfs holds
        (SHM_DIR, 8192, [(-1, b"x")], _linux._STAGE_WRITE, errno.EINVAL),
    ],
    ids=["open-missing", "open-not-a-dir", "fallocate-too-big", "pwrite-bad-offset"],
)
def test_build_reports_the_failed_step_as_its_python_twin_does(
    directory: str, total: int, pieces: Any, stage: int, code: int
) -> None:
    before = set(os.listdir("/proc/self/fd"))
    fast = _linux._fastpath.build(directory, UNNAMED, total, pieces)
    slow = _linux._build_python(directory, UNNAMED, total, pieces)
    assert fast == slow == (-1, code, stage)
    assert set(os.listdir("/proc/self/fd")) <= before  # nothing left open


@needs_c
def test_build_refuses_malformed_pieces_as_its_python_twin_does() -> None:
    for pieces in ([(0, "text")], [(0, b"x", 1)], [("0", b"x")]):
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises((TypeError, ValueError)):
            _linux._fastpath.build(SHM_DIR, UNNAMED, 8192, pieces)
        with pytest.raises((TypeError, ValueError)):
            _linux._build_python(SHM_DIR, UNNAMED, 8192, pieces)
        assert set(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize(
    "code,stage,expected",
    [
        (errno.ENOSPC, _linux._STAGE_RESERVE, shmem.NoSpace),
        (errno.ENOMEM, _linux._STAGE_RESERVE, shmem.NoSpace),
        (errno.EFBIG, _linux._STAGE_RESERVE, shmem.NoSpace),
        (errno.ENOSPC, _linux._STAGE_WRITE, shmem.NoSpace),
        (errno.EOPNOTSUPP, _linux._STAGE_OPEN, shmem.ShmemError),
        (errno.EACCES, _linux._STAGE_OPEN, PermissionError),
        (errno.EIO, _linux._STAGE_WRITE, OSError),
    ],
)
def test_a_failed_build_step_becomes_the_shmem_error(code: int, stage: int, expected: type) -> None:
    err = _linux._build_error(code, stage, 8192, "name")
    assert isinstance(err, expected)
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == code
    if isinstance(err, shmem.NoSpace):
        assert err.errno == errno.ENOSPC


def test_build_unnamed_turns_a_file_too_big_into_no_space_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_linux, "_PRECHECK_BYTES", 1 << 62)  # so that fallocate itself fails
    for build in {_linux._build, _linux._build_python}:
        monkeypatch.setattr(_linux, "_build", build)
        with pytest.raises(shmem.NoSpace):
            _linux.build_unnamed((1 << 63) - 1, [(0, b"x")], "name")


def _record_create_path_calls(monkeypatch: pytest.MonkeyPatch, shm_name: Callable[[], str]) -> List[str]:
    """Create and remove a block with the create path's os functions replaced by
    recorders; the names of those called, in order."""
    calls: List[str] = []
    for name in ("posix_fallocate", "pwrite", "link", "unlink"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    block = shmem.SharedMemory(shm_name(), create=True, size=4096, track=False)
    block.close()
    block.unlink()
    return calls


@pytest.mark.usefixtures("python_platform")
def test_a_replaced_os_function_sees_every_call_of_the_create_path_under_python_platform(
    monkeypatch: pytest.MonkeyPatch, shm_name: Callable[[], str]
) -> None:
    """Fault injection replaces os functions: python_platform makes the twins
    run, so a replacement sees every call - on the C path too."""
    assert _record_create_path_calls(monkeypatch, shm_name) == ["posix_fallocate", "pwrite", "link", "unlink"]


@needs_c
def test_the_platform_calls_the_c_path_whatever_os_holds(
    monkeypatch: pytest.MonkeyPatch, shm_name: Callable[[], str]
) -> None:
    """Production code does not look for replaced os functions: without
    python_platform the C functions make the create path's calls themselves."""
    assert _record_create_path_calls(monkeypatch, shm_name) == []


@needs_c
def test_link_open_same_and_unlink_same_give_what_their_python_twins_give(shm_name: Callable[[], str]) -> None:
    paths = [os.path.join(SHM_DIR, shm_name()) for _ in range(2)]
    fds = [os.open(SHM_DIR, UNNAMED, 0o600) for _ in range(2)]
    try:
        inode = os.fstat(fds[0]).st_ino
        # link: a name for each unnamed file; the same name again is EEXIST on both paths.
        assert _linux._fastpath.link(fds[0], paths[0]) is None and _linux._link_python(fds[1], paths[1]) is None
        assert os.stat(paths[0]).st_ino == inode and os.stat(paths[1]).st_ino == os.fstat(fds[1]).st_ino
        assert _answer(lambda: _linux._fastpath.link(fds[1], paths[0])) == ("raise", (FileExistsError, errno.EEXIST))
        assert _answer(lambda: _linux._link_python(fds[1], paths[0])) == ("raise", (FileExistsError, errno.EEXIST))
        assert _answer(lambda: _linux._fastpath.link(9999, paths[0] + "x")) == _answer(
            lambda: _linux._link_python(9999, paths[0] + "x")
        )
        # open_same: the descriptor for the right inode, -1 (nothing left open) for another, or the open's error.
        for open_same in (_linux._fastpath.open_same, _linux._open_same_python):
            fd = open_same(paths[0], RO, inode)
            assert fd >= 0 and os.fstat(fd).st_ino == inode
            os.close(fd)
            before = set(os.listdir("/proc/self/fd"))
            assert open_same(paths[1], RO, inode) == -1
            assert set(os.listdir("/proc/self/fd")) <= before
        fast_missing = _answer(lambda: _linux._fastpath.open_same(paths[0] + "x", RO, inode))
        assert fast_missing == _answer(lambda: _linux._open_same_python(paths[0] + "x", RO, inode))
        assert fast_missing == ("raise", (FileNotFoundError, errno.ENOENT))
        # unlink_same: only the file with that inode; False for another file or none.
        assert _linux._fastpath.unlink_same(paths[1], inode) is False and os.path.exists(paths[1])
        assert _linux._unlink_same_python(paths[1], inode) is False and os.path.exists(paths[1])
        assert _linux._fastpath.unlink_same(paths[0], inode) is True and not os.path.exists(paths[0])
        assert _linux._fastpath.unlink_same(paths[0], inode) is False
        assert _linux._unlink_same_python(paths[0], inode) is False
        other = os.fstat(fds[1]).st_ino
        assert _linux._unlink_same_python(paths[1], other) is True and not os.path.exists(paths[1])
    finally:
        for fd in fds:
            os.close(fd)
        for path in paths:
            if os.path.lexists(path):
                os.unlink(path)


def test_publish_on_a_taken_name_is_segment_exists_on_both_paths(
    monkeypatch: pytest.MonkeyPatch, shm_name: Callable[[], str]
) -> None:
    name = shm_name()
    taken = shmem.SharedMemory(name, create=True, size=4096, track=False)
    try:
        for link in {_linux._link, _linux._link_python}:
            monkeypatch.setattr(_linux, "_link", link)
            fd = os.open(SHM_DIR, UNNAMED, 0o600)
            try:
                with pytest.raises(shmem.SegmentExists):
                    _linux.publish(fd, name)
            finally:
                os.close(fd)
    finally:
        taken.close()
        taken.unlink()
