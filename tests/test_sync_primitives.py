"""shmem.Event, Condition, Semaphore, BoundedSemaphore and Barrier (issue 12, second part):
threading's semantics across real processes, death of a party, signals, forged headers.
``test_pure_python_path_passes_the_core_tests`` runs the core again with ``SHMEM_PURE_PYTHON=1``."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import pytest
from _forge import forge_kind_header
from _sync_workers import (
    DEAD_HELD,
    HUNG,
    MISSING,
    STATE_SIZE,
    barrier_party,
    barrier_party_exit,
    consume,
    hold_and_die,
    set_event,
    wait_event,
)
from conftest import (
    PYTHON,
    close_under_waiters,
    in_child,
    kill_and_reap,
    mapped_with_prefix,
    run_pure_python,
    wait_until,
)

import shmem
from shmem._kinds import sync_layout, sync_wait

SHM_DIR = "/dev/shm"
METHODS = ["spawn", "fork", "forkserver"]


def forked(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


# ------------------------------------------------------------------ Event


@pytest.mark.parametrize("method", METHODS)
def test_event_across_processes(method: str) -> None:
    event = shmem.Event()
    ctx = multiprocessing.get_context(method)
    waiters = [ctx.Process(target=wait_event, args=(event, 30)) for _ in range(3)]
    for w in waiters:
        w.start()
    time.sleep(0.2)
    assert not event.is_set()
    setter = ctx.Process(target=set_event, args=(event,))
    setter.start()
    for p in [setter, *waiters]:
        p.join(30)
        assert p.exitcode == 0
    assert event.is_set() and event.wait(0)
    event.clear()
    start = time.monotonic()
    assert event.wait(0.2) is False
    assert 0.19 <= time.monotonic() - start < 1
    event.close()


def test_event_waiter_killed_set_still_works() -> None:
    event = shmem.Event()
    pid = forked(lambda: (event.wait(), None)[1])
    time.sleep(0.2)
    kill_and_reap(pid)
    done: List[bool] = []
    t = threading.Thread(target=lambda: done.append(event.wait(10)))
    t.start()
    event.set()
    t.join(10)
    assert done == [True]
    event.close()


def test_named_event_shared_pickled_and_removed(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    a, b = shmem.Event(name=name), shmem.Event(name=name)
    a.set()
    assert b.is_set()
    c = pickle.loads(pickle.dumps(b))
    assert c.is_set() and c.name == name
    for e in (a, b, c):
        e.close()
    assert not os.path.exists(f"{SHM_DIR}/{name}")


# ------------------------------------------------------------------ Semaphore


def test_semaphore_semantics() -> None:
    sem = shmem.Semaphore(2)
    assert sem.get_value() == 2
    assert sem.acquire() and sem.acquire(timeout=1)
    assert not sem.acquire(False) and not sem.acquire(block=False)
    start = time.monotonic()
    assert not sem.acquire(timeout=0.2)
    assert 0.19 <= time.monotonic() - start < 1
    sem.release(2)
    with sem:
        assert sem.get_value() == 1
    assert sem.get_value() == 2
    sem.release()  # an unbounded semaphore grows
    assert sem.get_value() == 3
    sem.close()


def test_bounded_semaphore_over_release() -> None:
    sem = shmem.BoundedSemaphore(2)
    with pytest.raises(ValueError, match="too many"):
        sem.release()
    sem.acquire()
    with pytest.raises(ValueError):
        sem.release(2)
    sem.release()
    assert sem.get_value() == 2
    sem.close()


def test_bad_arguments_are_refused(shm_name: Callable[[], str]) -> None:
    with pytest.raises(ValueError):
        shmem.Semaphore(-1)
    with pytest.raises(TypeError):
        shmem.Semaphore(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        shmem.Barrier(0)
    with pytest.raises(TypeError):
        shmem.Barrier(2, action=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        shmem.Condition(threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        shmem.Event(name=3)  # type: ignore[arg-type]
    name = shm_name()
    event = shmem.Event(name=name)
    with pytest.raises(shmem.CorruptSegment, match=name):
        shmem.Semaphore(name=name)
    with pytest.raises(shmem.CorruptSegment, match=name):
        shmem.Lock(name=name)
    event.close()
    sem = shmem.Semaphore(name=name)
    with pytest.raises(shmem.CorruptSegment, match="BoundedSemaphore"):
        shmem.BoundedSemaphore(name=name)
    sem.close()
    assert os.listdir(SHM_DIR).count(name) == 0


def test_semaphore_holders_sigkilled_give_their_permits_back() -> None:
    sem = shmem.Semaphore(3)
    ctx = multiprocessing.get_context("fork")
    for _ in range(4):
        ready = [ctx.Event() for _ in range(3)]
        procs = [ctx.Process(target=hold_and_die, args=(sem, r, random.uniform(0, 0.05))) for r in ready]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == -signal.SIGKILL
        assert sem.get_value() == 3
    # A waiter gets a dead holder's permit within about a slice.
    pid = forked(lambda: (sem.acquire(), sem.acquire(), sem.acquire(), time.sleep(60)))
    assert wait_until(lambda: sem.get_value() == 0, 10)
    threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()
    start = time.monotonic()
    assert sem.acquire(timeout=10)
    assert time.monotonic() - start < 2
    os.waitpid(pid, 0)
    sem.release()
    assert sem.get_value() == 3
    sem.close()


def test_semaphore_across_spawned_processes_and_release_by_another() -> None:
    sem = shmem.Semaphore(0)
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=set_event_via_release, args=(sem,))
    p.start()
    assert sem.acquire(timeout=30)
    p.join(30)
    assert p.exitcode == 0
    assert sem.get_value() == 0
    sem.close()


def set_event_via_release(sem: Any) -> None:
    sem.release()


# ------------------------------------------------------------------ Condition


@pytest.mark.parametrize("method", METHODS)
def test_condition_notify_and_notify_all_across_processes(method: str) -> None:
    cond = shmem.Condition()
    items = shmem.SharedMemory(create=True, size=8)
    ctx = multiprocessing.get_context(method)
    consumers = [ctx.Process(target=consume, args=(cond, items.name)) for _ in range(3)]
    for c in consumers:
        c.start()
    time.sleep(0.5)
    with cond:
        items.buf[0] = 1
        cond.notify()
    time.sleep(0.3)
    with cond:
        items.buf[0] += 2
        cond.notify_all()
    for c in consumers:
        c.join(30)
        assert c.exitcode == 0
    assert items.buf[0] == 0
    items.close()
    items.unlink()
    cond.close()


def test_condition_wait_needs_the_lock_and_restores_recursion() -> None:
    lock = shmem.RLock()
    cond = shmem.Condition(lock)
    with pytest.raises(RuntimeError):
        cond.wait(0)
    with pytest.raises(RuntimeError):
        cond.notify()
    lock.acquire()
    lock.acquire()
    seen: List[bool] = []
    t = threading.Thread(target=lambda: seen.append(lock.acquire(timeout=5) and (lock.release() or True)))
    t.start()
    assert cond.wait(0.3) is False  # the other thread got the lock meanwhile: fully released
    t.join(5)
    assert seen == [True]
    lock.release()
    assert lock._is_owned()
    lock.release()
    assert not lock._is_owned()
    cond.close()
    lock.close()


def test_condition_waiter_killed_notify_still_wakes_the_live_one() -> None:
    lock = shmem.Lock()
    cond = shmem.Condition(lock)

    def die_waiting() -> None:
        with cond:
            cond.wait()

    pid = forked(die_waiting)
    time.sleep(0.3)
    kill_and_reap(pid)
    flag: List[bool] = []
    got: List[bool] = []

    def live() -> None:
        with cond:
            got.append(cond.wait_for(lambda: flag, 10))

    t = threading.Thread(target=live)
    t.start()
    time.sleep(0.2)
    start = time.monotonic()
    with cond:
        flag.append(True)
        cond.notify()
    t.join(10)
    assert got == [[True]] and time.monotonic() - start < 2
    cond.close()
    lock.close()


# ------------------------------------------------------------------ Barrier


@pytest.mark.parametrize("method", METHODS)
def test_barrier_across_processes(method: str) -> None:
    barrier = shmem.Barrier(3)
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:
        result = pool.starmap_async(barrier_party, [(barrier, 30), (barrier, 30)])
        mine = barrier.wait(30)
        indices = sorted([mine, *result.get(30)])
    assert indices == [0, 1, 2]
    assert barrier.n_waiting == 0 and not barrier.broken and barrier.parties == 3
    barrier.close()


def test_barrier_action_runs_once_and_reset_abort() -> None:
    calls: List[int] = []
    barrier = shmem.Barrier(2, action=lambda: calls.append(1))
    t = threading.Thread(target=barrier.wait, args=(10,))
    t.start()
    barrier.wait(10)
    t.join(10)
    assert calls == [1]
    barrier.abort()
    assert barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(1)
    barrier.reset()
    assert not barrier.broken
    errors: List[BaseException] = []

    def waiting() -> None:
        try:
            barrier.wait(10)
        except threading.BrokenBarrierError as err:
            errors.append(err)

    t = threading.Thread(target=waiting)
    t.start()
    assert wait_until(lambda: barrier.n_waiting == 1, 5)
    barrier.reset()
    t.join(10)
    assert len(errors) == 1 and not barrier.broken
    with pytest.raises(threading.BrokenBarrierError):  # a timeout breaks it
        barrier.wait(0.1)
    assert barrier.broken
    barrier.close()


def test_barrier_party_killed_breaks_it_for_the_rest() -> None:
    barrier = shmem.Barrier(4)
    ctx = multiprocessing.get_context("fork")
    other = ctx.Process(target=barrier_party_exit, args=(barrier, 60))
    other.start()
    pid = forked(lambda: (barrier.wait(60), None)[1])
    errors: List[float] = []

    def party() -> None:
        try:
            barrier.wait(60)
        except threading.BrokenBarrierError:
            errors.append(time.monotonic())

    t = threading.Thread(target=party)
    t.start()
    assert wait_until(lambda: barrier.n_waiting == 3, 10)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert errors and errors[0] - killed < 3
    os.waitpid(pid, 0)
    other.join(30)
    assert other.exitcode != 0  # it got BrokenBarrierError too
    assert barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(1)
    barrier.close()


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("kind", ["event", "semaphore", "condition", "barrier"])
def test_ctrl_c_during_a_blocking_wait(kind: str) -> None:
    obj: Any
    if kind == "event":
        obj = shmem.Event()
        call: Callable[[], Any] = obj.wait
    elif kind == "semaphore":
        obj = shmem.Semaphore(0)
        call = obj.acquire
    elif kind == "condition":
        obj = shmem.Condition()

        def call() -> None:
            with obj:
                obj.wait()

    else:
        obj = shmem.Barrier(2)
        call = obj.wait
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    try:
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            call()
        assert time.monotonic() - start < 0.2 + 0.5
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    if kind == "condition":
        assert not obj.lock.locked()
    if kind == "barrier":
        assert obj.broken
    obj.close()


def test_a_signal_handler_uses_another_primitive_while_the_main_thread_waits() -> None:
    waited, other = shmem.Event(), shmem.Semaphore(1)
    ran: List[bool] = []

    def handler(signum: int, frame: Any) -> None:
        with other:
            ran.append(other.get_value() == 0)

    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.15, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    setter = threading.Timer(0.5, waited.set)
    try:
        timer.start()
        setter.start()
        assert waited.wait(10)
        assert ran == [True] and other.get_value() == 1
    finally:
        timer.cancel()
        setter.cancel()
        signal.signal(signal.SIGUSR1, previous)
    waited.close()
    other.close()


# ------------------------------------------------------------------ programs and headers

RACER = """
import sys, time, shmem
name, kind, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
while time.time() < start:
    pass
obj = {"event": shmem.Event, "semaphore": shmem.Semaphore, "barrier": lambda name: shmem.Barrier(2, name=name),
       "condition": shmem.Condition}[kind](name=name)
print(obj._block.inode, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("kind", ["event", "semaphore", "barrier", "condition"])
def test_unrelated_programs_race_to_create_the_same_named_primitive(kind: str, shm_name: Callable[[], str]) -> None:
    name = shm_name()
    start = time.time() + 0.6
    envs = [dict(os.environ), {**os.environ, "SHMEM_PURE_PYTHON": "1"}]
    programs = [
        subprocess.Popen(
            [PYTHON, "-c", RACER, name, kind, repr(start)],
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


@pytest.mark.parametrize(
    "extra",
    [
        b"",
        b"garbage",
        b"shmsync\0" + bytes(32),
        b"shmsync\0\x02\x00" + bytes(30),
        b"shmsync\0\x01\x00\x09\x00" + bytes(28),
        b"shmsync\0\x01\x00\x01\x00\x28\x00\x00\x00" + bytes(8) + b"musl".ljust(16, b"\0"),
    ],
)
def test_forged_headers_are_refused(extra: bytes, shm_name: Callable[[], str]) -> None:
    name = shm_name()
    event = shmem.Event(name=name)
    forge_kind_header(name, extra)
    with pytest.raises(shmem.CorruptSegment, match=name):
        shmem.Event(name=name)
    shmem.list_segments()  # the listing copes with it
    event.close()
    assert not os.path.exists(f"{SHM_DIR}/{name}")


def test_an_overwritten_mutex_is_refused(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    sem = shmem.Semaphore(name=name)
    fd = os.open(f"{SHM_DIR}/{name}", os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff" * 64, 0)
    finally:
        os.close(fd)
    with pytest.raises(shmem.CorruptSegment, match="mutex"):
        shmem.Semaphore(name=name)
    sem.close()


def test_listing_shows_the_kinds(shm_name: Callable[[], str]) -> None:
    names = [shm_name() for _ in range(4)]
    objs = [
        shmem.Event(name=names[0]),
        shmem.BoundedSemaphore(3, name=names[1]),
        shmem.Barrier(4, name=names[2]),
        shmem.Condition(name=names[3]),
    ]
    by_name = {s.name: s for s in shmem.list_segments()}
    assert [by_name[n].kind for n in names] == ["event", "semaphore", "barrier", "condition"]
    assert dict(by_name[names[0]].kind_fields) == {"type": "Event", "is_set": False}
    assert dict(by_name[names[1]].kind_fields) == {
        "type": "BoundedSemaphore",
        "value": 3,
        "available": 3,
        "held": 0,
        "held_by_dead": 0,
        "holders": (),
    }
    assert dict(by_name[names[2]].kind_fields) == {
        "type": "Barrier",
        "parties": 4,
        "n_waiting": 0,
        "broken": False,
        "waiting_pids": (),
    }
    assert dict(by_name[names[3]].kind_fields) == {"type": "Condition", "n_waiting": 0}
    for o in objs:
        o.close()


def _fields(obj: Any) -> dict:
    return dict(shmem.inspect_segment(obj.name).kind_fields)


def test_live_state_of_holders_waiters_and_the_dead() -> None:
    """What ``inspect_segment`` reads from the block at that moment: the processes holding
    permits, a dead holder's permits until they are given back, the parties waiting at a
    barrier and a party's death, the event's flag, the condition's waiters."""
    sem, barrier, event, cond = shmem.Semaphore(4), shmem.Barrier(3), shmem.Event(), shmem.Condition()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=hold_and_die, args=(sem, ready, 60))
    holder.start()
    assert ready.wait(30)
    assert sem.acquire() and sem.acquire()
    fields = _fields(sem)
    assert (fields["available"], fields["held"], fields["held_by_dead"]) == (1, 3, 0)
    by_pid = {pid: h.permits for h in fields["holders"] for pid in h.pids}
    assert by_pid == {os.getpid(): 2, holder.pid: 1}
    kill_and_reap(holder.pid)  # type: ignore[arg-type]
    holder.join()
    fields = _fields(sem)
    assert (fields["available"], fields["held"], fields["held_by_dead"]) == (1, 2, 1)
    assert sem.get_value() == 2  # given back now
    assert _fields(sem)["held_by_dead"] == 0
    sem.release(2)
    assert _fields(sem)["holders"] == ()

    party = forked(lambda: (barrier.wait(60), None)[1])
    t = threading.Thread(target=lambda: pytest.raises(threading.BrokenBarrierError, barrier.wait, 60))
    t.start()
    assert wait_until(lambda: _fields(barrier)["n_waiting"] == 2, 10)
    assert sorted(_fields(barrier)["waiting_pids"]) == sorted([os.getpid(), party])
    kill_and_reap(party)
    t.join(30)
    assert _fields(barrier)["broken"] is True and _fields(barrier)["n_waiting"] == 0

    assert _fields(event)["is_set"] is False
    event.set()
    assert _fields(event)["is_set"] is True

    def waiting() -> None:
        with cond:
            cond.wait(30)

    waiter = forked(waiting)
    assert wait_until(lambda: _fields(cond)["n_waiting"] == 1, 10)
    with cond:
        cond.notify()
    os.waitpid(waiter, 0)
    assert _fields(cond)["n_waiting"] == 0
    for o in (sem, barrier, event, cond):
        o.close()


def test_state_readers_refuse_what_cannot_be_a_live_primitive() -> None:
    """The readers of sync_layout take a copy of hostile bytes: short, an overwritten
    mutex, words out of range give None; a pending journal entry is applied."""
    sem = shmem.BoundedSemaphore(3)
    extra = sem._block.header.extra  # type: ignore[union-attr]
    size = sync_layout.data_size(sync_layout.TYPE_BOUNDED)
    good = bytes(sem._block.mapping[:size])  # type: ignore[union-attr,index]
    state = sync_layout.semaphore_state(extra, good)
    assert state == sync_layout.SemaphoreState(3, 3, ())
    assert sync_layout.sync_state(extra, good) == state
    assert sync_layout.event_state(extra, good) is None  # not an event
    assert sync_layout.semaphore_state(extra, good[: size - 1]) is None
    assert sync_layout.semaphore_state(extra, b"\xff" * 64 + good[64:]) is None

    def with_words(**changes: int) -> Optional[sync_layout.SemaphoreState]:
        data = bytearray(good)
        for word, value in changes.items():
            index = getattr(sync_layout, word)
            data[64 + 4 * index : 68 + 4 * index] = value.to_bytes(4, "little")
        return sync_layout.semaphore_state(extra, bytes(data))

    assert with_words(W_VALUE=2**31) is None
    assert with_words(W_J_VALID=7) is None
    assert with_words(W_J_VALID=1, W_J_SLOT=sync_layout.SLOTS) is None
    assert with_words(W_J_VALID=1, W_J_SLOT=5, W_J_VALUE=1, W_J_COUNT=2) == sync_layout.SemaphoreState(3, 1, ((5, 2),))
    with pytest.raises(shmem.CorruptSegment):
        sync_layout.semaphore_state(b"garbage", good)
    sem.close()


def test_semaphore_holders_sigkilled_at_random_points(shm_name: Callable[[], str]) -> None:
    """1,000 holders, each SIGKILLed after a random 0-3 ms - before its first acquire,
    holding permits, inside a state change (journal), waiting - while a long-lived
    waiter competes: the waiter never hangs, every permit is back after each kill,
    and nothing is left behind.

    Each round costs milliseconds: the holders are forked from a prepared parent
    (``_sync_workers.sem_kill_rounds``), not started as programs."""
    permits = 3
    sem = shmem.Semaphore(permits, name=shm_name())
    state = shmem.SharedMemory(shm_name(), create=True, size=STATE_SIZE)
    assert state.buf is not None and sem.name is not None
    rounds = 1000
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from _sync_workers import sem_kill_rounds; "
    )
    code += f"sem_kill_rounds({sem.name!r}, {state.name!r}, {permits}, {rounds}, 12)"
    start = time.monotonic()
    run = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=240)
    took = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    v = state.buf.cast("q")
    try:
        assert (v[HUNG], v[MISSING]) == (0, 0), summary
        assert summary["waiter_exit"] == 0 and summary["value"] == permits, summary
        assert summary["worst_ns"] < 3e9, summary
        assert v[DEAD_HELD] >= rounds // 20, v[DEAD_HELD]  # many kills catch a holder holding permits
        assert sem.get_value() == permits
        fields = dict(shmem.inspect_segment(sem.name).kind_fields)
        assert (fields["available"], fields["held"], fields["held_by_dead"]) == (permits, 0, 0)
    finally:
        v.release()
        state.close()
        state.unlink()
        sem.close()
    assert took < 60, took


def test_nothing_is_mapped_or_open_after_close(shm_prefix: str) -> None:
    sem = shmem.Semaphore()
    sem.acquire()
    sem.release()
    objs: List[Any] = [sem, shmem.Event(), shmem.Condition(), shmem.Barrier(1)]
    objs[3].wait(1)
    for o in objs:
        o.close()
    assert not mapped_with_prefix(shm_prefix)


def test_implementation_follows_the_environment() -> None:
    pure = os.environ.get("SHMEM_PURE_PYTHON", "") not in ("", "0")
    assert sync_wait.ACCELERATED is not pure


def _wait_on(kind: str, handle: Any) -> Any:
    if kind == "Event":
        return handle.wait(30)
    if kind == "Semaphore":
        return handle.acquire(timeout=30)
    if kind == "Condition":
        with handle:
            return handle.wait(30)
    return handle.wait(30)  # Barrier


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the threads: on purpose
@pytest.mark.parametrize("kind", ["Event", "Semaphore", "Condition", "Barrier"])
def test_close_while_other_threads_wait_through_the_same_handle(kind: str) -> None:
    """close() while two threads of this process sleep in a wait through that handle (the GIL
    released): the mapping stays until they are out, each raises ValueError saying so (before:
    "released memoryview" from Event.wait, and in the pure-Python path a segfault when a ctypes
    call touched the unmapped mutex), and the primitive, open through another handle, works on.
    In a forked child: a crash fails the test."""

    def body() -> List[str]:
        make = getattr(shmem, kind)
        other = make(0) if kind == "Semaphore" else make(3) if kind == "Barrier" else make()
        closing = make(3, name=other.name) if kind == "Barrier" else make(name=other.name)
        results = close_under_waiters(lambda: _wait_on(kind, closing), closing.close)
        if kind == "Event":  # the other handle works on
            other.set()
            assert other.wait(1)
        elif kind == "Semaphore":
            other.release()
            assert other.acquire(timeout=1)
        elif kind == "Condition":
            with other:
                other.notify_all()
        other.close()
        return [r.split(" (")[0] for r in results]  # "the lock is closed (not bound to ...)"

    # A waiter asleep at the close hears that it was closed while it waited; one that a busy
    # machine had not put to sleep yet, or that was between two waits, that it is closed. A
    # Condition opened by name closes the lock it opened with it: its waiters, taking the lock
    # back on their way out (and `with` releasing it), hear that the lock is closed.
    if kind == "Condition":
        said = {"ValueError: the lock is closed"}
    else:
        said = {
            f"ValueError: the shmem.{kind} was closed while this call waited",
            f"ValueError: the shmem.{kind} is closed",
        }
    results = in_child(body, timeout=60)
    assert len(results) == 2 and set(results) <= said, results


CORE = [
    "test_close_while_other_threads_wait_through_the_same_handle",
    "test_event_across_processes",
    "test_event_waiter_killed_set_still_works",
    "test_semaphore_semantics",
    "test_bounded_semaphore_over_release",
    "test_semaphore_holders_sigkilled_give_their_permits_back",
    "test_condition_notify_and_notify_all_across_processes",
    "test_condition_wait_needs_the_lock_and_restores_recursion",
    "test_barrier_action_runs_once_and_reset_abort",
    "test_barrier_party_killed_breaks_it_for_the_rest",
    "test_ctrl_c_during_a_blocking_wait",
    "test_implementation_follows_the_environment",
]


@pytest.mark.skipif(not sync_wait.ACCELERATED, reason="this run is the pure-Python path already")
def test_pure_python_path_passes_the_core_tests() -> None:
    run = run_pure_python(__file__, " or ".join(CORE))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


CLOSERANGE = r"""
import os, sys
import shmem

sem = shmem.Semaphore(2)
assert sem.acquire(timeout=5)  # claims a slot: the handle now keeps a descriptor
sem.release()
log = sys.argv[1]
os.closerange(3, 65536)  # daemonizing code: every descriptor above stderr goes
with open(log, "w") as f:  # ... and the numbers are reused
    f.write("precious")
    f.flush()
    assert sem.acquire(timeout=5) and sem.acquire(timeout=5)  # the slot is claimed afresh
    assert not sem.acquire(block=False)
    sem.release(2)
    assert sem.get_value() == 2
    sem.close()  # never closes the reused number
    f.write(" log")
with open(log) as f:
    assert f.read() == "precious log"
print("ok")
"""


def test_a_semaphore_survives_os_closerange(tmp_path: Path) -> None:
    """After os.closerange() a handle never uses, locks or closes a descriptor number
    that now belongs to another file; it opens the block again and works on."""
    done = subprocess.run(
        [PYTHON, "-c", CLOSERANGE, str(tmp_path / "app.log")], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_the_semaphores_c_fast_path_is_taken_and_agrees_with_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same sequence, with the whole-in-C acquire/release and without: the same values."""
    from shmem._kinds import semaphore

    if semaphore._FAST is None:
        pytest.skip("pure-Python path: no C fast path to compare")

    class Counting:
        def __init__(self, real: Any) -> None:
            self.real, self.calls = real, 0

        def sem_take(self, *args: Any) -> bool:
            self.calls += 1
            return bool(self.real.sem_take(*args))

        def sem_give(self, *args: Any) -> bool:
            self.calls += 1
            return bool(self.real.sem_give(*args))

    def run() -> List[Any]:
        sem, seen = shmem.BoundedSemaphore(3), []
        try:
            for _ in range(3):
                seen.append(sem.acquire(timeout=1))
            seen += [sem.acquire(block=False), sem.get_value()]
            sem.release(2)
            seen.append(sem.get_value())
            with pytest.raises(ValueError):
                sem.release(2)  # past the bound: refused, nothing changes
            sem.release()
            seen.append(sem.get_value())
        finally:
            sem.close()
        return seen

    counting = Counting(semaphore._FAST)
    monkeypatch.setattr(semaphore, "_FAST", counting)
    fast = run()
    assert counting.calls >= 4
    monkeypatch.setattr(semaphore, "_FAST", None)
    assert run() == fast == [True, True, True, False, 0, 2, 3]
