"""Shared test fixtures.

Every test runs under a unique name prefix (``SHMEM_NAME_PREFIX`` in the
environment, inherited by subprocesses, so even generated names carry it).
After the test, the guard waits briefly for reapers to finish, then *fails*
the test if a block with its prefix is left in /dev/shm, still mapped in
this process, or still open on a file descriptor of this process (an unnamed
block being created included) - and removes those blocks, which the test
made by construction.
Nothing else in /dev/shm is ever touched: other programs use it.

Tests that create blocks with the standard library must name them with
``shm_name()`` (the standard library ignores the prefix variable).
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import multiprocessing.shared_memory
import os
import pickle
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

import pytest

import shmem

SHM_DIR = "/dev/shm"
_counter = itertools.count()
_RUN = secrets.token_hex(2)

#: How long the guard waits for a reaper to remove blocks of processes that exited.
REAP_WAIT = 5.0

#: The environment variable that names a process tree's reaper; children inherit it
#: and share that reaper.
REAPER_ENV = "SHMEM_REAPER"
#: Part of every reaper's command line.
REAPER_MARK = b"shmem._core.reaper"


def blocks_with_prefix(prefix: str) -> List[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def mapped_with_prefix(prefix: str) -> List[str]:
    with open("/proc/self/maps") as f:
        return [line.split(None, 5)[-1].strip() for line in f if f"{SHM_DIR}/{prefix}" in line]


def shm_descriptors(prefix: str) -> Dict[int, str]:
    """This process's descriptors open on a block with ``prefix``, or on an
    unnamed file in /dev/shm (a block being created: O_TMPFILE shows as '#...')."""
    found = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:  # closed meanwhile (the listing's own descriptor, too)
            continue
        if target.startswith(f"{SHM_DIR}/{prefix}") or target.startswith(f"{SHM_DIR}/#"):
            found[int(entry)] = target
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = REAP_WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(autouse=True)
def shm_prefix(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The unique name prefix of this test; guards against leaked blocks and mappings."""
    prefix = f"shmt{_RUN}_{os.getpid()}_{next(_counter)}_"
    monkeypatch.setenv(shmem._core.names.PREFIX_ENV, prefix)
    # Subprocesses a test starts get a reaper of their own, not the test runner's:
    # a test that kills "everything" of its programs kills their reaper too.
    monkeypatch.delenv("SHMEM_REAPER", raising=False)
    open_before = shm_descriptors(prefix)
    yield prefix
    objects = sys.modules.get("shmem._kinds.objects")
    if objects is not None:
        objects._drop_default_stores()  # a process keeps its first default store while it runs
    gc.collect()
    expected_failure = request.node.get_closest_marker("xfail") is not None
    wait_until(lambda: not blocks_with_prefix(prefix))
    leaked = blocks_with_prefix(prefix)
    mapped = mapped_with_prefix(prefix)
    fds = {fd: target for fd, target in shm_descriptors(prefix).items() if open_before.get(fd) != target}
    for name in leaked:
        os.unlink(f"{SHM_DIR}/{name}")
    if (leaked or mapped or fds) and not expected_failure:
        pytest.fail(f"test leaked blocks {leaked} / mappings {mapped} / file descriptors {fds}")


@pytest.fixture
def shm_name(shm_prefix: str) -> Callable[[], str]:
    """Call it for a fresh block name under this test's prefix."""
    counter = itertools.count()
    return lambda: f"{shm_prefix}{next(counter)}"


@pytest.fixture
def drop_cached_array_mappings() -> Iterator[None]:
    """shmem keeps recently used array blocks mapped (by design, across tests):
    drop that cache after the test, before the leak guard looks at /proc/self/maps."""
    yield
    from shmem._kinds import array_mappings  # needs NumPy: only array tests use this fixture

    array_mappings.drop_cached_mappings()
    gc.collect()


#: Every C-backed name of ``shmem._platform._linux`` and its pure-Python twin,
#: with the calls the twin makes. The C functions (``shmem._platform._fastpath``)
#: make their system calls directly, and the platform calls them whatever ``os``
#: holds: a test that replaces one of these os functions (to make a step fail,
#: stall or be recorded) must select the twins - ``python_platform`` - or its
#: replacement is never called. A child process can select them from this
#: mapping too (test_defect_create_attach's stalled creator).
PYTHON_PLATFORM_TWINS = {
    "_build": "_build_python",  # os.open, os.fstat, os.fchmod, os.posix_fallocate, os.pwrite
    "_link": "_link_python",  # os.link
    "_open_same": "_open_same_python",  # os.open, os.fstat
    "_unlink_same": "_unlink_same_python",  # os.stat, os.unlink
    "_open_block_fast": "_open_block_python",  # os.open, fcntl.fcntl, os.fstat
    "_identity": "_identity_python",  # os.fstat
    "_close_if": "_close_if_python",  # os.fstat, os.close
}


@pytest.fixture
def python_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that replace ``os`` functions the platform layer calls: for the
    test, ``shmem._platform._linux`` calls its pure-Python twins, which call
    ``os`` (the C fast paths would bypass the replacement)."""
    from shmem._platform import _linux

    for name, twin in PYTHON_PLATFORM_TWINS.items():
        monkeypatch.setattr(_linux, name, getattr(_linux, twin))


STDLIB_FAILS = "the standard library has this defect"


def implementations(reason: str = STDLIB_FAILS) -> list:
    """Parametrize a test over shmem and the standard library; the standard
    library variant is a strict xfail, so the test must fail on it - proof that
    the test can fail, and that it checks a defect shmem fixes."""
    return [
        pytest.param(shmem.shared_memory, id="shmem"),
        pytest.param(
            multiprocessing.shared_memory,
            id="stdlib",
            marks=pytest.mark.xfail(strict=True, reason=reason),
        ),
    ]


START_METHODS = [m for m in ("spawn", "fork", "forkserver") if m in multiprocessing.get_all_start_methods()]


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context(request.param)


PYTHON = sys.executable


def run_to_completion(processes: List[multiprocessing.process.BaseProcess], timeout: float = 60) -> None:
    """Start every process, wait for all of them, and require that each exited with 0."""
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


# ------------------------------------------------------------------ reapers
#
# One reaper serves a whole process tree: children inherit SHMEM_REAPER and
# share the reaper it names. A test that kills a reaper must never kill the
# pytest process's: it starts its subprocesses with ``own_reaper.env`` (no
# SHMEM_REAPER, whatever the environment holds by then), so they start a
# reaper of their own, and the fixture makes sure those reapers do not outlive
# the test.


class ProcessRef:
    """A process told apart from a later one that reuses its pid (pid + start time)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        fields = _stat_fields(pid)
        self.start_time = fields[19] if fields else None

    def alive(self) -> bool:
        """Running (a zombie counts as gone: it holds no memory, descriptors or locks)."""
        fields = _stat_fields(self.pid)
        return bool(fields) and fields[19] == self.start_time and fields[0] not in (b"Z", b"X")

    def cmdline(self) -> bytes:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""

    def is_reaper(self) -> bool:
        return self.alive() and REAPER_MARK in self.cmdline()

    def status(self, field: str) -> int:
        """A counter of /proc/PID/status summed over all the process's threads."""
        total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(field + ":"):
                            total += int(line.split()[1])
            except OSError:  # the thread ended meanwhile
                pass
        return total

    def wait_gone(self, timeout: float = REAP_WAIT) -> bool:
        return wait_until(lambda: not self.alive(), timeout)

    def kill(self) -> None:
        """SIGKILL it if it still is the reaper we knew (never a process that reused its pid)."""
        if self.is_reaper():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __repr__(self) -> str:
        return f"ProcessRef({self.pid})"


def _stat_fields(pid: int) -> Optional[List[bytes]]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(b")") + 2 :].split()


def own_reaper_pid() -> Optional[int]:
    """The reaper of this (the pytest) process, if it has one."""
    try:
        from shmem._core import tracking
    except ImportError:
        return None
    return tracking.reaper_pid()


def reapers_started_under(prefix: str) -> List[ProcessRef]:
    """Reapers whose environment carries this test's name prefix: started by the
    test's processes (best effort: a reaper may be started with a clean environment)."""
    mark = f"{shmem._core.names.PREFIX_ENV}={prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if REAPER_MARK not in f.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        found.append(ProcessRef(int(entry)))
    return found


class OwnReaper:
    """Environment for subprocesses that must start a reaper of their own, and the
    record of the reapers they started (``add`` the pids they report)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.env: Dict[str, str] = {k: v for k, v in os.environ.items() if k != REAPER_ENV}
        self.known: List[ProcessRef] = []

    def add(self, pid: Optional[int]) -> Optional[ProcessRef]:
        if pid is None:
            return None
        ref = ProcessRef(pid)
        self.known.append(ref)
        return ref

    def cleanup(self) -> None:
        """Give the reapers time to finish and exit by themselves; SIGKILL those that do not."""
        ours = own_reaper_pid()
        refs: Dict[int, ProcessRef] = {r.pid: r for r in self.known + reapers_started_under(self.prefix)}
        left: Set[ProcessRef] = {r for pid, r in refs.items() if pid != ours}
        wait_until(lambda: not any(r.alive() for r in left))
        for ref in left:
            ref.kill()


@pytest.fixture
def own_reaper(shm_prefix: str) -> Iterator[OwnReaper]:
    """For tests that kill reapers: ``own_reaper.env`` keeps subprocesses off the
    pytest process's reaper; the reapers they start do not outlive the test."""
    record = OwnReaper(shm_prefix)
    try:
        yield record
    finally:
        record.cleanup()


def kill_and_reap(pid: int) -> None:
    """SIGKILL our child ``pid`` (gone already is fine) and collect its exit status."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def run_pure_python(test_file: str, selection: str) -> subprocess.CompletedProcess[str]:
    """Run the tests of ``test_file`` that ``selection`` (a pytest -k expression)
    picks again in a fresh pytest with ``SHMEM_PURE_PYTHON=1`` and no other
    SHMEM_ variable: the fallback of a C fast path, in the same tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMEM_")}
    env["SHMEM_PURE_PYTHON"] = "1"
    return subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def fork_child(body: Callable[[], None]) -> int:
    """Fork a child that runs ``body`` and leaves with os._exit (0 if it returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def fork_threaded_child(body: Callable[[], None]) -> int:
    """``fork_child`` from a process that runs other threads on purpose: without Python's
    DeprecationWarning about forking a multi-threaded process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fork_child(body)


def close_under_waiters(wait: Callable[[], Any], close: Callable[[], None], waiters: int = 2) -> List[str]:
    """Start ``waiters`` threads that each call ``wait()`` through one handle, let them fall
    asleep in it (the GIL released), ``close()`` that handle, and join them: what each call
    returned (its repr) or raised ("Type: message"), in the order they ended."""
    results: List[str] = []

    def run() -> None:
        try:
            results.append(repr(wait()))
        except Exception as err:
            results.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=run) for _ in range(waiters)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # asleep in wait
    close()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a waiter never came out"
    return results


def hold_in_child(take: Callable[[], None], then: Callable[[], None] = lambda: time.sleep(60)) -> int:
    """Fork a child that runs ``take`` (takes a lock, scribbles on a block...), then ``then``
    (by default: stays a minute, to be killed); return its pid once ``take`` is done."""
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        take()
        os.write(w, b"1")
        then()

    pid = fork_child(child)
    os.close(w)
    try:
        assert select.select([r], [], [], 10)[0], "the child never got through take()"
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
    return pid


def wait_exit(pid: int, timeout: float = 30) -> int:
    """The exit code of child ``pid``; SIGKILLed (and the test failed) if it hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    kill_and_reap(pid)
    pytest.fail(f"child {pid} hung")


def in_child(body: Callable[[], Any], timeout: float = 60) -> Any:
    """Run ``body`` in a forked child, with a deadline: its result (pickled back through a
    pipe); its exception's traceback fails the test; a child that hangs is SIGKILLed and
    fails it too (a deadlock shows as a failure, never as a hung test run)."""
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        try:
            out = pickle.dumps(("ok", body()))
        except BaseException:
            out = pickle.dumps(("error", traceback.format_exc()))
        with os.fdopen(w, "wb") as f:
            f.write(out)

    pid = fork_threaded_child(child)
    os.close(w)
    chunks: List[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                kill_and_reap(pid)
                pytest.fail(f"the child hung (a deadlock?) after {timeout} s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    code = wait_exit(pid)
    assert chunks, f"the child died with {code} without a word (a signal? -7 is SIGBUS, -11 SIGSEGV)"
    status, value = pickle.loads(b"".join(chunks))
    assert status == "ok", f"in the child:\n{value}"
    assert code == 0
    return value
