"""asyncio waits on shmem's primitives (shmem.aio): real processes hold and
release, the coroutine waits in the event loop without a thread of its own."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from typing import Any

import pytest

import shmem
import shmem.aio


def hold_then_release(lock: Any, held: Any, seconds: float) -> None:
    lock.acquire()
    held.set()
    time.sleep(seconds)
    lock.release()


def set_later(event: Any, seconds: float) -> None:
    time.sleep(seconds)
    event.set()


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
