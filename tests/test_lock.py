"""shmem.Lock and shmem.RLock: mutual exclusion between processes, and holder death.

Real processes and real signals. The core of the file runs again with
``SHMEM_PURE_PYTHON=1`` (``test_pure_python_path_passes_the_core_tests``):
the ctypes twin must behave as the C extension does.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from _forge import forge_kind_header, peek, poke
from _lock_workers import ACQUIRED, BACKWARDS, BAD, COUNTER, DIED, HUNG, REPAIRED, STATE_SIZE, A, B, count, locked_job
from conftest import (
    PYTHON,
    close_under_waiters,
    hold_in_child,
    in_child,
    kill_and_reap,
    mapped_with_prefix,
    run_pure_python,
    wait_until,
)

import shmem
from shmem._core.header import EXTRA_OFFSET, TRAILER_SIZE
from shmem._kinds import lock_layout

SHM_DIR = "/dev/shm"


# ------------------------------------------------------------------ helpers


def fork_holder(lock: Any, then: Callable[[], None] = lambda: time.sleep(60)) -> int:
    """Fork a child that acquires ``lock`` and then runs ``then`` (by default: hold
    it for a minute); return its pid once it holds the lock. The child never
    returns into pytest: it leaves with os._exit (without releasing, unless
    ``then`` does)."""
    return hold_in_child(lock.acquire, then)


def reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def acquire_recording(lock: Any, **kwargs: Any) -> Tuple[bool, List[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lock.acquire(**kwargs)
    return got, [w for w in caught if issubclass(w.category, shmem.OwnerDiedWarning)]


@pytest.fixture
def counter_block() -> Iterator[shmem.SharedMemory]:
    shm = shmem.SharedMemory(create=True, size=64)
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()


# ------------------------------------------------------------------ the API


def test_implementation_follows_the_environment() -> None:
    pure = os.environ.get("SHMEM_PURE_PYTHON", "") not in ("", "0")
    assert lock_layout.ACCELERATED is not pure
    assert shmem.Lock.__mro__[1] is lock_layout.RobustMutex
    if not pure:  # the C side and the pure-Python twin agree on the ABI they share
        from shmem import _sync

        assert (_sync.MUTEX_SIZE, _sync.MUTEX_ALIGN, _sync.KIND_OFFSET) == lock_layout._PURE_ABI["x86_64"]
        for recursive in (False, True):
            assert _sync.new_mutex(recursive) == lock_layout.new_mutex_py(recursive)


def test_acquire_release_locked_and_context_manager() -> None:
    lock = shmem.Lock()
    assert lock.name and lock.name in os.listdir(SHM_DIR)
    assert not lock.locked() and not lock.owner_died
    assert lock.acquire() is True
    assert lock.locked() and lock._is_owned()
    assert lock.acquire(False) is False
    assert lock.acquire(block=False) is False
    assert lock.acquire(blocking=False) is False
    assert lock.acquire(True, 0) is False
    assert lock.acquire(timeout=0.01) is False
    assert "locked" in repr(lock)
    lock.release()
    assert not lock.locked()
    with lock as entered:
        assert entered is True and lock.locked()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    assert lock.acquire(timeout=-1) is True  # threading's "no timeout"
    lock.release()
    assert lock.acquire(timeout=10**30) is True  # forever, for all practical purposes
    lock.release()
    lock.close()
    lock.close()
    assert lock.name is None and "closed" in repr(lock)
    with pytest.raises(ValueError, match="closed"):
        lock.acquire()


def test_bad_arguments_are_refused_clearly() -> None:
    lock = shmem.Lock()
    with pytest.raises(ValueError, match="non-negative"):
        lock.acquire(timeout=-0.5)
    with pytest.raises(ValueError, match="NaN"):
        lock.acquire(timeout=float("nan"))
    with pytest.raises(TypeError, match="timeout"):
        lock.acquire(timeout="1")
    with pytest.raises(TypeError):
        lock.acquire(True, 1, 2)
    with pytest.raises(TypeError):
        lock.acquire(True, blocking=True)
    with pytest.raises(TypeError):
        lock.acquire(wait=True)
    assert lock.acquire(False, -5) is True  # a timeout means nothing to a non-blocking call
    lock.release()
    assert not lock.locked()
    with pytest.raises(TypeError, match="name"):
        shmem.Lock(name=b"jobs")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        shmem.Lock(b"jobs")  # type: ignore[arg-type]
    with pytest.raises(shmem.InvalidName):
        shmem.Lock(name="a/b")
    lock.close()


def test_a_name_that_is_not_a_lock_is_refused_naming_it(shm_name: Callable[[], str]) -> None:
    raw = shmem.SharedMemory(shm_name(), create=True, size=64)
    lst = shmem.ShareableList([1, 2])
    rlock = shmem.RLock()
    try:
        with pytest.raises(shmem.CorruptSegment, match=f"{raw.name}.*raw block, not a shmem.Lock"):
            shmem.Lock(name=raw.name)
        with pytest.raises(shmem.CorruptSegment, match=f"{lst.shm.name}.*list block"):
            shmem.RLock(name=lst.shm.name)
        with pytest.raises(shmem.CorruptSegment, match=f"{rlock.name}.*shmem.RLock, not a shmem.Lock"):
            shmem.Lock(name=rlock.name)
    finally:
        raw.close()
        raw.unlink()
        lst.shm.close()
        lst.shm.unlink()
        rlock.close()


def test_a_standard_library_block_is_not_a_lock(shm_name: Callable[[], str]) -> None:
    from multiprocessing import resource_tracker, shared_memory

    name = shm_name()
    stdlib = shared_memory.SharedMemory(name, create=True, size=64)
    resource_tracker.unregister("/" + name, "shared_memory")
    try:
        with pytest.raises(shmem.CorruptSegment, match=f"{name}.*not made by shmem"):
            shmem.Lock(name=name)
    finally:
        stdlib.close()
        os.unlink(f"{SHM_DIR}/{name}")


def test_named_lock_is_shared_and_removed_with_its_last_user(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    a = shmem.Lock(name=name)
    b = shmem.Lock(name=name)
    assert a._block.inode == b._block.inode  # type: ignore[union-attr]
    with a:
        assert b.locked() and not b.acquire(False)
    a.close()
    b.close()
    assert wait_until(lambda: name not in os.listdir(SHM_DIR))


def test_pickling_passes_the_lock_by_name() -> None:
    lock = shmem.RLock()
    copy = pickle.loads(pickle.dumps(lock))
    assert type(copy) is shmem.RLock and copy.name == lock.name and copy is not lock
    with lock:
        assert copy.locked()
    copy.close()
    with pytest.raises(ValueError, match="closed"):
        pickle.dumps(copy)
    lock.close()


def test_close_while_held_is_refused() -> None:
    lock = shmem.Lock()
    lock.acquire()
    with pytest.raises(RuntimeError, match="release it first"):
        lock.close()
    lock.release()
    lock.close()


# ------------------------------------------------------------------ RLock


def test_rlock_recursion_and_release_by_a_non_owner() -> None:
    rlock = shmem.RLock()
    assert rlock.acquire() and rlock.acquire() and rlock.acquire(False)
    for _ in range(3):
        rlock.release()
    assert not rlock.locked()
    with pytest.raises(RuntimeError):
        rlock.release()
    rlock.acquire()
    errors: List[BaseException] = []

    def other_thread() -> None:
        try:
            rlock.release()
        except RuntimeError as err:
            errors.append(err)
        errors.append(RuntimeError("acquired")) if rlock.acquire(timeout=0.05) else None

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    rlock.release()
    rlock.close()


def test_lock_release_by_another_thread_or_process_is_refused() -> None:
    lock = shmem.Lock()
    lock.acquire()
    errors: List[BaseException] = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, lock.release).value))
    t.start()
    t.join()
    assert "only its owner" in str(errors[0])
    pid = os.fork()
    if pid == 0:  # a forked child does not own what its parent holds
        code = 1
        try:
            if lock.locked() and not lock._is_owned() and lock.acquire(timeout=0.05) is False:
                try:
                    lock.release()
                except RuntimeError:
                    code = 0
        finally:
            os._exit(code)
    assert reap(pid) == 0
    assert lock._is_owned()
    lock.release()
    lock.close()


# ------------------------------------------------------------------ between processes


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_mutual_exclusion_across_processes(method: str, counter_block: shmem.SharedMemory) -> None:
    ctx = multiprocessing.get_context(method)
    lock = shmem.Lock()
    procs, rounds = 4, 1500
    workers = [ctx.Process(target=count, args=(lock, counter_block.name, rounds)) for _ in range(procs)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    assert COUNTER.unpack_from(counter_block.buf, 0)[0] == procs * rounds  # type: ignore[arg-type]
    lock.close()


def test_pickled_to_pool_workers() -> None:
    lock = shmem.Lock()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(locked_job, [(lock, i) for i in range(6)])
    assert {name for _, name, _ in results} == {lock.name}
    assert [doubled for _, _, doubled in results] == [0, 2, 4, 6, 8, 10]
    assert all(pid != os.getpid() for pid, _, _ in results)
    lock.close()


def test_timeout_returns_false_in_time() -> None:
    lock = shmem.Lock()
    pid = fork_holder(lock)
    try:
        for wait in (0.0, 0.12, 0.3):
            start = time.monotonic()
            assert lock.acquire(timeout=wait) is False
            took = time.monotonic() - start
            assert wait <= took < wait + 0.25, (wait, took)
        start = time.monotonic()
        assert lock.acquire(False) is False and time.monotonic() - start < 0.05
    finally:
        kill_and_reap(pid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", shmem.OwnerDiedWarning)
        assert lock.acquire(timeout=5)
    lock.release()
    lock.close()


def test_holder_sigkilled_at_random_points(shm_name: Callable[[], str]) -> None:
    """1,000 holders SIGKILLed at random points of a two-step update, while a
    long-lived waiter competes for the lock: a half-done update is always
    announced by owner_died, the waiter gets the lock after every kill (no
    hang), the counter never goes backwards, and nothing is left behind.

    Each round costs milliseconds: the holders are forked from a prepared
    parent (``_lock_workers.kill_rounds``), not started as programs."""
    lock = shmem.Lock(name=shm_name())
    state = shmem.SharedMemory(shm_name(), create=True, size=STATE_SIZE)
    assert state.buf is not None and lock.name is not None
    rounds = 1000
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from _lock_workers import kill_rounds; "
    code += f"kill_rounds({lock.name!r}, {state.name!r}, {rounds}, 12)"
    start = time.monotonic()
    run = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=240)
    took = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    v = state.buf.cast("q")
    try:
        counts = {key: v[slot] for key, slot in (("bad", BAD), ("backwards", BACKWARDS), ("hung", HUNG))}
        assert counts == {"bad": 0, "backwards": 0, "hung": 0}, (counts, summary)
        assert summary["waiter_exit"] == 0
        assert summary["worst_ns"] < 3e9, summary  # from a kill's reaping to the waiter's next acquisition
        assert v[DIED] >= rounds // 10, v[DIED]  # many kills catch a holder that holds it
        assert v[REPAIRED] > 0  # and some catch it between the two halves of its update
        assert v[ACQUIRED] >= rounds
        got, _ = acquire_recording(lock, timeout=10)
        assert got
        assert v[A] == v[B] or lock.owner_died  # the last holder's update: whole, or announced
        lock.release()
    finally:
        v.release()
        state.close()
        state.unlink()
        lock.close()
    assert took < 120, took


def test_a_thread_that_ends_holding_the_lock_releases_it() -> None:
    for cls in (shmem.Lock, shmem.RLock):
        lock = cls()
        t = threading.Thread(target=lambda: lock.acquire() and lock.acquire(False))
        t.start()
        t.join()
        got, warned = acquire_recording(lock, timeout=5)
        assert got and lock.owner_died and len(warned) == 1
        assert "died holding it" in str(warned[0].message)
        assert warned[0].filename == __file__  # the warning points at the caller's acquire
        if cls is shmem.RLock:  # owner_died until the last release
            lock.acquire()
            lock.release()
            assert lock.owner_died
        lock.release()
        assert not lock.owner_died
        assert lock.acquire(timeout=1) and not lock.owner_died
        lock.release()
        lock.close()


def test_owner_died_warning_as_error_leaves_the_lock_free_and_usable() -> None:
    lock = shmem.Lock()
    pid = fork_holder(lock, lambda: None)  # acquires and exits without releasing
    os.waitpid(pid, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", shmem.OwnerDiedWarning)
        with pytest.raises(shmem.OwnerDiedWarning):
            lock.acquire()
    assert not lock.locked() and not lock.owner_died
    assert lock.acquire(timeout=1) and not lock.owner_died  # consistent again
    lock.release()
    lock.close()


def test_fork_of_a_holder() -> None:
    lock = shmem.Lock()
    lock.acquire()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:  # the child does not hold its parent's lock, nor can it take it
            if lock.locked() and not lock._is_owned() and not lock.acquire(timeout=0.1):
                code = 0
        finally:
            os._exit(code)
    assert reap(pid) == 0
    assert lock._is_owned() and not lock.owner_died
    lock.release()
    lock.close()


# ------------------------------------------------------------------ signals


def test_ctrl_c_during_a_blocking_acquire() -> None:
    lock = shmem.Lock()
    pid = fork_holder(lock)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    try:
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
        assert time.monotonic() - start < 0.2 + 0.3
        assert lock.locked() and not lock._is_owned()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
        kill_and_reap(pid)
    lock.close()


def test_a_signal_handler_uses_another_lock_while_the_main_thread_waits() -> None:
    waited, other = shmem.Lock(), shmem.RLock()
    ran: List[bool] = []

    def handler(signum: int, frame: Any) -> None:
        with other:
            ran.append(other._is_owned())

    pid = fork_holder(waited, lambda: (time.sleep(0.6), waited.release()))
    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.15, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    try:
        timer.start()
        got, warned = acquire_recording(waited, timeout=10)
        assert got and not warned and not waited.owner_died
        assert ran == [True] and not other.locked()
        waited.release()
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
        assert reap(pid) == 0
    waited.close()
    other.close()


# ------------------------------------------------------------------ programs

RACER = """
import sys, time, shmem
name, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
lock = shmem.Lock(name=name)
with lock:
    print(lock._block.inode, flush=True)
sys.stdin.read()  # stay a user of the lock until the test has compared
"""


def test_unrelated_programs_race_to_create_the_same_named_lock(shm_name: Callable[[], str]) -> None:
    for _ in range(4):
        name = shm_name()
        start = time.time() + 0.6
        envs = [dict(os.environ), {**os.environ, "SHMEM_PURE_PYTHON": "1"}]  # C and pure share it
        programs = [
            subprocess.Popen(
                [PYTHON, "-c", RACER, name, repr(start)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=envs[i % 2],
                text=True,
            )
            for i in range(4)
        ]
        try:
            inodes = {p.stdout.readline().strip() for p in programs}  # type: ignore[union-attr]
            assert len(inodes) == 1 and "" not in inodes
        finally:
            for p in programs:
                p.communicate(timeout=30)
                assert p.returncode == 0
        assert wait_until(lambda: name not in os.listdir(SHM_DIR))


HOLDER = """
import os, sys, time, shmem
lock = shmem.Lock(name=sys.argv[1])
lock.acquire()
del lock  # the object goes, the lock stays held: its mapping must stay too
import gc; gc.collect()
with open("/proc/self/maps") as f:
    mapped = sys.argv[1] in f.read()
print(mapped, flush=True)
time.sleep(60)
"""


def test_a_deallocated_held_lock_stays_mapped_and_dies_with_its_process(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    program = subprocess.Popen([PYTHON, "-c", HOLDER, name], stdout=subprocess.PIPE, text=True)
    try:
        assert program.stdout.readline().strip() == "True"  # type: ignore[union-attr]
        lock = shmem.Lock(name=name)
        assert lock.locked() and lock.acquire(timeout=0.1) is False
    finally:
        program.kill()
        program.wait()
    got, warned = acquire_recording(lock, timeout=5)
    assert got and lock.owner_died and warned
    lock.release()
    lock.close()
    assert wait_until(lambda: name not in os.listdir(SHM_DIR))  # nothing left behind


def test_a_killed_creator_leaves_nothing_behind(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    holder = "import sys, time, shmem\nl = shmem.RLock(name=sys.argv[1]); l.acquire(); print(1, flush=True)\n"
    program = subprocess.Popen([PYTHON, "-c", holder + "time.sleep(60)", name], stdout=subprocess.PIPE, text=True)
    assert program.stdout.readline().strip() == "1"  # type: ignore[union-attr]
    assert name in os.listdir(SHM_DIR)
    program.kill()
    program.wait()
    assert wait_until(lambda: name not in os.listdir(SHM_DIR))


# ------------------------------------------------------------------ shmem info


def lock_fields(name: str) -> Dict[str, Any]:
    return dict(shmem.inspect_segment(name).kind_fields)


def cli(*args: str) -> str:
    done = subprocess.run([PYTHON, "-m", "shmem", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout


FREE = {"type": "Lock", "holder_tid": None, "holder_pid": None, "waiters": False, "owner_died": False}


def test_info_shows_the_holder_its_waiters_and_a_dead_owner(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    lock = shmem.Lock(name=name)
    assert lock_fields(name) == {**FREE, "recoverable": True}
    pid = fork_holder(lock)
    try:
        held = lock_fields(name)
        assert (held["holder_pid"], held["holder_tid"], held["waiters"], held["owner_died"]) == (pid, pid, False, False)
        waiter = threading.Thread(target=lock.acquire, kwargs={"timeout": 0.6})
        waiter.start()
        assert wait_until(lambda: lock_fields(name)["waiters"], 3), "the kernel's waiters bit never showed"
        record = json.loads(cli("info", name, "--json"))
        assert (record["holder_pid"], record["holder_tid"], record["waiters"]) == (pid, pid, True)
        text = cli("info", name)
        assert f"holder                  pid {pid} (thread {pid})\n" in text and "waiters                 yes" in text
        assert f"lock Lock (held by pid {pid})" in cli("ls")
        waiter.join()
    finally:
        kill_and_reap(pid)
    died = lock_fields(name)  # killed holding it, and nobody has acquired it since
    assert (died["owner_died"], died["holder_pid"], died["holder_tid"], died["recoverable"]) == (True, None, None, True)
    assert "owner died              yes" in cli("info", name)
    assert "lock Lock (holder died)" in cli("ls")
    got, warned = acquire_recording(lock, timeout=5)
    assert got and lock.owner_died and warned
    mine = lock_fields(name)  # the flag moved from the block to the new owner's lock.owner_died
    assert (mine["holder_pid"], mine["holder_tid"], mine["owner_died"]) == (os.getpid(), os.getpid(), False)
    lock.release()
    assert lock_fields(name)["holder_pid"] is None
    lock.close()


def test_info_names_the_holding_thread_and_its_process() -> None:
    lock = shmem.RLock()
    assert lock.name is not None
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(10)
        fields = lock_fields(lock.name)
        assert fields["type"] == "RLock" and fields["holder_pid"] == os.getpid()
        assert fields["holder_tid"] == thread.native_id != os.getpid()
    finally:
        done.set()
        thread.join()
    lock.close()


def test_info_of_a_forged_mutex_never_crashes(shm_name: Callable[[], str]) -> None:
    """The mutex's words are hostile input: odd values are shown as read, an
    overwritten mutex is unreadable, and neither the library nor the command fails."""
    name = shm_name()
    lock = shmem.Lock(name=name)
    saved = peek(name, 0, lock_layout.LOCK_SIZE)
    try:
        poke(name, 0, struct.pack("<i", 1))  # "held by thread 1": init, which has no such block mapped
        fields = lock_fields(name)
        assert (fields["holder_tid"], fields["holder_pid"]) == (1, None)
        assert "thread 1 (no process here" in cli("info", name)
        poke(name, 0, struct.pack("<I", 0xFFFFFFFF))  # every bit: a tid that cannot exist, waiters, owner died
        fields = lock_fields(name)
        assert (fields["holder_tid"], fields["holder_pid"], fields["waiters"], fields["owner_died"]) == (
            0x3FFFFFFF,
            None,
            True,
            True,
        )
        poke(name, 0, saved[:4])
        poke(name, 8, struct.pack("<i", 0x7FFFFFFE))  # glibc's "not recoverable" owner
        assert lock_fields(name)["recoverable"] is False and "(not recoverable)" in cli("ls")
        poke(name, 0, saved)
        poke(name, lock_layout.KIND_OFFSET, b"\x00\x00\x00\x00")  # not a robust shared mutex any more
        assert set(lock_fields(name).values()) == {"Lock", None}
        assert "mutex unreadable" in cli("ls") and "holds no valid mutex" in cli("info", name)
        record = json.loads(cli("info", name, "--json"))
        assert record["holder_pid"] is None and record["waiters"] is None
    finally:
        poke(name, 0, saved)
    assert lock_fields(name) == {**FREE, "recoverable": True}
    lock.close()


# ------------------------------------------------------------------ hostile blocks


def _trailer(name: str) -> int:
    return os.stat(f"{SHM_DIR}/{name}").st_size - TRAILER_SIZE


GOOD = lock_layout.kind_header(False)
FORGED = [
    (b"", "lock header of 0 bytes"),
    (GOOD[:-3], "lock header of"),
    (b"shmlisX\0" + GOOD[8:], "wrong magic"),
    (GOOD[:8] + struct.pack("<H", 9) + GOOD[10:], "version 9"),
    (GOOD[:10] + struct.pack("<H", 7) + GOOD[12:], "unknown lock type 7"),
    (GOOD[:12] + struct.pack("<I", 24) + GOOD[16:], "another C library"),
    (GOOD[:16] + struct.pack("<I", 8) + GOOD[20:], "another C library"),
    (GOOD[:20] + b"musl".ljust(16, b"\0"), "another C library .'musl'"),
]


@pytest.mark.parametrize("extra, message", FORGED, ids=range(len(FORGED)))
def test_a_forged_lock_header_is_refused(extra: bytes, message: str, shm_name: Callable[[], str]) -> None:
    name = shm_name()
    lock = shmem.Lock(name=name)
    forge_kind_header(name, extra)
    with pytest.raises(shmem.CorruptSegment, match=message) as raised:
        shmem.Lock(name=name)
    assert name in str(raised.value)
    lock.close()


def test_an_overwritten_mutex_or_truncated_block_is_refused(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    lock = shmem.Lock(name=name)
    kind = lock_layout.KIND_OFFSET
    saved = peek(name, kind, 4)
    poke(name, kind, b"\x00\x00\x00\x00")  # a plain, private mutex: no robust list, no sharing
    with pytest.raises(shmem.CorruptSegment, match="not a robust process-shared"):
        shmem.Lock(name=name)
    poke(name, kind, saved)
    trailer = peek(name, _trailer(name), TRAILER_SIZE)
    os.truncate(f"{SHM_DIR}/{name}", 100)  # another process cut the file short
    with pytest.raises((shmem.CorruptSegment, shmem.SegmentNotFound)):
        shmem.Lock(name=name)
    os.truncate(f"{SHM_DIR}/{name}", 4096 + TRAILER_SIZE)
    poke(name, 4096, trailer)  # whole again
    with shmem.Lock(name=name) as again:
        assert again is True
    lock.close()
    assert EXTRA_OFFSET  # (the trailer's layout is _core.header's)


def test_forged_headers_in_a_child_never_crash_it(shm_name: Callable[[], str]) -> None:
    """Attaching a forged lock in another process: a clean exception, exit code 0."""
    name = shm_name()
    lock = shmem.Lock(name=name)
    forge_kind_header(name, b"\xff" * 36)
    code = (
        "import sys, shmem\n"
        "try:\n    shmem.Lock(name=sys.argv[1])\n"
        "except shmem.CorruptSegment as err:\n    print(err)\n"
    )
    run = subprocess.run([PYTHON, "-c", code, name], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "wrong magic" in run.stdout, run.stderr
    lock.close()


# ------------------------------------------------------------------ the pure-Python path

CORE = [
    "test_implementation_follows_the_environment",
    "test_acquire_release_locked_and_context_manager",
    "test_bad_arguments_are_refused_clearly",
    "test_rlock_recursion_and_release_by_a_non_owner",
    "test_lock_release_by_another_thread_or_process_is_refused",
    "test_mutual_exclusion_across_processes",
    "test_timeout_returns_false_in_time",
    "test_holder_sigkilled_at_random_points",
    "test_info_shows_the_holder_its_waiters_and_a_dead_owner",
    "test_info_of_a_forged_mutex_never_crashes",
    "test_a_thread_that_ends_holding_the_lock_releases_it",
    "test_owner_died_warning_as_error_leaves_the_lock_free_and_usable",
    "test_ctrl_c_during_a_blocking_acquire",
    "test_a_signal_handler_uses_another_lock_while_the_main_thread_waits",
    "test_a_deallocated_held_lock_stays_mapped_and_dies_with_its_process",
    "test_an_overwritten_mutex_or_truncated_block_is_refused",
    "test_close_while_another_thread_waits_in_acquire",
]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the threads: on purpose
@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_close_while_another_thread_waits_in_acquire(kind: str) -> None:
    """close() while threads of this process are asleep in acquire through the same handle (the
    GIL released): the mapping stays until they are out, and each raises ValueError instead of
    touching unmapped memory (this was a segfault). The lock itself, held by another handle, is
    unaffected. In a forked child: a crash fails the test."""

    def body() -> List[str]:
        holder = getattr(shmem, kind)()
        holder.acquire()
        waiting = getattr(shmem, kind)(name=holder.name)  # a second handle, closed under its waiters
        results = close_under_waiters(lambda: waiting.acquire(timeout=30), waiting.close)
        holder.release()
        assert holder.acquire(timeout=10)  # free: neither waiter took it on its way out
        holder.release()
        holder.close()
        return sorted(results)

    assert in_child(body, timeout=60) == ["ValueError: the lock was closed while this acquire waited"] * 2


@pytest.mark.skipif(not lock_layout.ACCELERATED, reason="this run is the pure-Python path already")
def test_pure_python_path_passes_the_core_tests() -> None:
    run = run_pure_python(__file__, " or ".join(CORE))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.split("\n")[-2]


def test_nothing_is_mapped_after_close(shm_prefix: str) -> None:
    locks = [shmem.Lock(), shmem.RLock(), shmem.Lock(name=shm_prefix + "x")]
    assert mapped_with_prefix(shm_prefix)
    for lock in locks:
        lock.close()
    gc.collect()
    assert not mapped_with_prefix(shm_prefix)


def test_shmem_ls_shows_a_lock_and_its_type(shm_name: Callable[[], str]) -> None:
    """The listing names the kind and the lock's type, in text and in JSON."""
    import json

    name = shm_name()
    lock = shmem.RLock(name=name)
    try:
        listed = subprocess.run(
            [PYTHON, "-m", "shmem", "ls", "--json"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        (record,) = [r for r in json.loads(listed) if r["name"] == name]
        assert (record["kind"], record["type"], record["detail"], record["state"]) == (
            "lock",
            "RLock",
            "RLock",
            "alive",
        )
    finally:
        lock.close()
    assert wait_until(lambda: not os.path.exists(f"/dev/shm/{name}"))


def test_the_name_may_be_given_by_position_as_in_the_issue(shm_name: Callable[[], str]) -> None:
    """``shmem.Lock("jobs")`` and ``shmem.Lock(name="jobs")`` are the same lock (Event too)."""
    name = shm_name()
    first, second = shmem.Lock(name), shmem.Lock(name=name)
    event_name = shm_name()
    ready, same = shmem.Event(event_name), shmem.Event(name=event_name)
    try:
        assert first.name == second.name == name
        assert first.acquire() and not second.acquire(block=False)
        first.release()
        ready.set()
        assert same.is_set()
    finally:
        for primitive in (first, second, ready, same):
            primitive.close()
