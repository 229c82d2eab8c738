"""asyncio waits on shmem's primitives (shmem.aio): real processes hold and
release, notify and meet at barriers; the coroutine waits in the event loop
without a thread of its own. ``test_pure_python_path`` runs the file again
with ``SHMEM_PURE_PYTHON=1``."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, List

import pytest
from conftest import run_pure_python

import shmem
import shmem.aio
from shmem._kinds import sync_wait


def hold_then_release(lock: Any, held: Any, seconds: float) -> None:
    lock.acquire()
    held.set()
    time.sleep(seconds)
    lock.release()


def set_later(event: Any, seconds: float) -> None:
    time.sleep(seconds)
    event.set()


def notify_later(cond: Any, state: Any, seconds: float) -> None:
    time.sleep(seconds)
    with cond:
        state.set()
        cond.notify()


def barrier_party(barrier: Any, timeout: float) -> int:
    return int(barrier.wait(timeout))


@pytest.fixture
def spawn() -> Any:
    return multiprocessing.get_context("spawn")


def test_async_with_a_lock_another_process_holds(spawn: Any) -> None:
    lock, held = shmem.Lock(), spawn.Event()
    holder = spawn.Process(target=hold_then_release, args=(lock, held, 0.3))
    holder.start()
    try:
        assert held.wait(60)
        threads_before = threading.active_count()

        async def main() -> bool:
            assert not await shmem.aio.acquire(lock, timeout=0.05)  # still held: the timeout wins
            ticks = 0

            async def ticker() -> None:  # the loop keeps running while we wait
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            task = asyncio.ensure_future(ticker())
            async with lock:
                assert threading.active_count() == threads_before  # no thread parked for the waiter
                owned = lock.locked()
            task.cancel()
            assert ticks > 5
            return owned

        assert asyncio.run(main())
        assert not lock.locked()
    finally:
        holder.join(60)
        assert holder.exitcode == 0
        lock.close()


def test_await_an_event_set_by_another_process(spawn: Any) -> None:
    event = shmem.Event()
    setter = spawn.Process(target=set_later, args=(event, 0.2))
    setter.start()
    try:
        assert not asyncio.run(shmem.aio.wait(event, timeout=0.01))
        assert asyncio.run(shmem.aio.wait(event, timeout=30))
    finally:
        setter.join(60)
        event.close()


def test_semaphore_permits_and_cancellation() -> None:
    sem = shmem.Semaphore(1)

    async def main() -> None:
        async with sem:
            waiter = asyncio.ensure_future(shmem.aio.acquire(sem))
            await asyncio.sleep(0.02)
            waiter.cancel()  # a cancelled waiter takes nothing
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert await shmem.aio.acquire(sem, timeout=1)
        sem.release()

    asyncio.run(main())
    assert sem.get_value() == 1
    sem.close()


def test_bad_arguments_are_refused() -> None:
    rlock, lock, event = shmem.RLock(), shmem.Lock(), shmem.Event()

    async def main() -> None:
        with pytest.raises(TypeError, match="RLock belongs to a thread"):
            await shmem.aio.acquire(rlock)
        with pytest.raises(TypeError, match="RLock"):
            async with rlock:
                pass
        with pytest.raises(TypeError):
            await shmem.aio.acquire(event)
        with pytest.raises(TypeError):
            await shmem.aio.wait(lock)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await shmem.aio.acquire(lock, timeout=-1)
        with pytest.raises(TypeError):
            await shmem.aio.wait(event, timeout="1")  # type: ignore[arg-type]

    asyncio.run(main())
    for primitive in (rlock, lock, event):
        primitive.close()


# ------------------------------------------------------------------ Condition


def test_await_a_condition_notified_by_another_process(spawn: Any) -> None:
    lock, state = shmem.Lock(), shmem.Event()
    cond = shmem.Condition(lock)
    notifier = spawn.Process(target=notify_later, args=(cond, state, 0.3))
    notifier.start()
    try:
        threads_before = threading.active_count()

        async def main() -> bool:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            task = asyncio.ensure_future(ticker())
            async with cond:
                assert lock.locked()
                assert not await shmem.aio.wait_condition(cond, timeout=0.02)  # nobody notified yet
                assert lock.locked()  # taken back after the timeout
                got = await shmem.aio.wait_condition_for(cond, state.is_set, timeout=30)
                assert threading.active_count() == threads_before
                assert lock._is_owned()
            assert not lock.locked()
            task.cancel()
            assert ticks > 5
            return got

        assert asyncio.run(main()) is True
        assert "waiters=0" in repr(cond)
    finally:
        notifier.join(60)
        assert notifier.exitcode == 0
        for primitive in (cond, lock, state):
            primitive.close()


def test_condition_wait_for_times_out_with_the_predicate_value() -> None:
    lock = shmem.Lock()
    cond = shmem.Condition(lock)

    async def main() -> None:
        async with cond:
            start = time.monotonic()
            assert await shmem.aio.wait_condition_for(cond, lambda: 0, timeout=0.1) == 0
            assert time.monotonic() - start >= 0.09
            assert await shmem.aio.wait_condition_for(cond, lambda: "ready", timeout=0) == "ready"
            assert lock.locked()

    asyncio.run(main())
    assert "waiters=0" in repr(cond)
    cond.close()
    lock.close()


def test_cancelled_condition_wait_counts_out_and_takes_the_lock_back() -> None:
    lock = shmem.Lock()
    cond = shmem.Condition(lock)
    held_when_cancelled: List[bool] = []

    async def waiter() -> None:
        async with cond:
            try:
                await shmem.aio.wait_condition(cond)
            except asyncio.CancelledError:
                held_when_cancelled.append(lock.locked())
                raise

    async def main() -> None:
        task = asyncio.ensure_future(waiter())
        while "waiters=1" not in repr(cond):
            await asyncio.sleep(0.005)
        assert not lock.locked()  # released while it waits
        assert lock.acquire(False)  # someone else holds the lock when the cancel arrives
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # it waits for the lock before CancelledError propagates
        assert "waiters=0" in repr(cond)
        lock.release()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert held_when_cancelled == [True]
    assert not lock.locked() and "waiters=0" in repr(cond)
    cond.close()
    lock.close()


# ------------------------------------------------------------------ Barrier


def test_barrier_with_an_async_party_and_two_processes(spawn: Any) -> None:
    barrier = shmem.Barrier(3)
    with spawn.Pool(2) as pool:
        result = pool.starmap_async(barrier_party, [(barrier, 30), (barrier, 30)])
        mine = asyncio.run(shmem.aio.wait_barrier(barrier, timeout=30))
        indices = sorted([mine, *result.get(30)])
    assert indices == [0, 1, 2]
    assert barrier.n_waiting == 0 and not barrier.broken
    # again, the coroutine last this time: it runs nothing but lets the others pass
    with spawn.Pool(2) as pool:
        result = pool.starmap_async(barrier_party, [(barrier, 30), (barrier, 30)])
        deadline = time.monotonic() + 30
        while barrier.n_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert asyncio.run(shmem.aio.wait_barrier(barrier, timeout=30)) == 2
        assert sorted(result.get(30)) == [0, 1]
    barrier.close()


def test_barrier_action_runs_in_the_async_party() -> None:
    calls: List[int] = []
    barrier = shmem.Barrier(1, action=lambda: calls.append(1))
    assert asyncio.run(shmem.aio.wait_barrier(barrier)) == 0
    assert calls == [1] and not barrier.broken
    barrier.close()


def test_barrier_timeout_and_cancellation_break_it() -> None:
    barrier = shmem.Barrier(2, timeout=0.05)

    async def main() -> None:
        start = time.monotonic()
        with pytest.raises(threading.BrokenBarrierError):  # the barrier's default timeout
            await shmem.aio.wait_barrier(barrier)
        assert time.monotonic() - start < 5
        assert barrier.broken
        with pytest.raises(threading.BrokenBarrierError):  # broken: at once
            await shmem.aio.wait_barrier(barrier, timeout=10)
        barrier.reset()
        with pytest.raises(threading.BrokenBarrierError):
            await shmem.aio.wait_barrier(barrier, timeout=0.05)
        barrier.reset()
        task = asyncio.ensure_future(shmem.aio.wait_barrier(barrier, timeout=30))
        while barrier.n_waiting < 1:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert barrier.broken  # cancellation breaks it, as a timeout does
        barrier.reset()
        # aborted while a coroutine waits
        task = asyncio.ensure_future(shmem.aio.wait_barrier(barrier, timeout=30))
        while barrier.n_waiting < 1:
            await asyncio.sleep(0.005)
        barrier.abort()
        with pytest.raises(threading.BrokenBarrierError):
            await task

    asyncio.run(main())
    barrier.close()


def test_barrier_party_killed_breaks_it_for_the_async_waiter(spawn: Any) -> None:
    barrier = shmem.Barrier(3)
    party = spawn.Process(target=barrier_party, args=(barrier, 60))
    party.start()
    try:

        async def main() -> float:
            task = asyncio.ensure_future(shmem.aio.wait_barrier(barrier, timeout=60))
            deadline = time.monotonic() + 30
            while barrier.n_waiting < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert barrier.n_waiting == 2
            assert party.pid is not None
            os.kill(party.pid, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(threading.BrokenBarrierError):
                await task
            return time.monotonic() - killed

        assert asyncio.run(main()) < 3
        assert barrier.broken
    finally:
        party.join(60)
        barrier.close()


# ------------------------------------------------------------------ arguments


def test_condition_and_barrier_bad_arguments_are_refused() -> None:
    lock, rlock, event = shmem.Lock(), shmem.RLock(), shmem.Event()
    cond, rcond, barrier = shmem.Condition(lock), shmem.Condition(rlock), shmem.Barrier(2)

    async def main() -> None:
        with pytest.raises(TypeError, match="RLock belongs to a thread"):
            async with rcond:
                pass
        with rcond:
            with pytest.raises(TypeError, match="RLock belongs to a thread"):
                await shmem.aio.wait_condition(rcond, timeout=1)
        with pytest.raises(TypeError):
            await shmem.aio.wait_condition(lock)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await shmem.aio.wait_condition_for(event, lambda: True)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="un-acquired"):
            await shmem.aio.wait_condition(cond, timeout=1)
        async with cond:
            with pytest.raises(ValueError):
                await shmem.aio.wait_condition(cond, timeout=-1)
            with pytest.raises(TypeError):
                await shmem.aio.wait_condition(cond, timeout="1")  # type: ignore[arg-type]
            assert lock.locked()
        with pytest.raises(TypeError):
            await shmem.aio.wait_barrier(event)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await shmem.aio.wait_barrier(barrier, timeout=float("nan"))

    asyncio.run(main())
    assert "waiters=0" in repr(cond) and "waiters=0" in repr(rcond)
    assert not barrier.broken and barrier.n_waiting == 0
    for primitive in (cond, rcond, barrier, lock, rlock, event):
        primitive.close()


@pytest.mark.skipif(not sync_wait.ACCELERATED, reason="this run is the pure-Python path already")
def test_pure_python_path() -> None:
    run = run_pure_python(__file__, "not test_pure_python_path")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
