"""shmem.Queue, SimpleQueue and JoinableQueue: multiprocessing's API, one shared block,
processes killed anywhere, hostile blocks.

Real processes, real /dev/shm, real signals; timeouts are only safety nets. The
core of the file runs again with ``SHMEM_PURE_PYTHON=1``
(``test_pure_python_path_passes_the_core_tests``): the ring's pure-Python twin
must behave as the C extension does.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import pickle
import queue
import random
import select
import signal
import struct
import subprocess
import threading
import time
import weakref
from typing import Any, Callable, List, Tuple

import _queue_workers as workers
import pytest
from conftest import (
    PYTHON,
    fork_child,
    fork_threaded_child,
    hold_in_child,
    in_child,
    kill_and_reap,
    run_pure_python,
    wait_exit,
    wait_until,
)
from test_defect_space import private_shm_available, run_in_private_shm  # noqa: F401 - a fixture

import shmem
from shmem._kinds import lock_layout, queue_layout, queue_plain, queue_ring, sync_wait

SHM_DIR = "/dev/shm"
PURE = os.environ.get("SHMEM_PURE_PYTHON", "") not in ("", "0")


# ------------------------------------------------------------------ helpers


def mutex_word(q: Any) -> int:
    """The owners (thread ids) in the lock words of the queue's three glibc mutexes - the
    ring's, the producers', the consumers' - or'ed: 0 when all are free. (A mutex whose
    holder died and that no one has taken since is free, with only FUTEX_OWNER_DIED set.)"""
    words = [struct.unpack_from("<I", q._block.mapping, off)[0] for off in queue_layout.MUTEX_OFFSETS]
    return int((words[0] | words[1] | words[2]) & 0x3FFFFFFF)  # FUTEX_TID_MASK


def drain(q: Any) -> List[bytes]:
    out = []
    while True:
        try:
            out.append(q.get(False))
        except queue.Empty:
            return out


def read_all(fd: int) -> bytes:
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ 1. the API


def test_implementation_follows_the_environment() -> None:
    assert queue_ring.ACCELERATED is not PURE
    assert (queue_ring.RingCore is queue_ring.PyRingCore) is PURE


def test_put_get_nowait_timeouts_maxsize_and_sizes() -> None:
    q = shmem.Queue(maxsize=3, capacity=256)
    assert q.maxsize == 3 and q.capacity == 256 and q.name in os.listdir(SHM_DIR)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put(1)
    q.put_nowait("two")
    q.put([3], timeout=0.1)
    assert q.qsize() == 3 and q.full() and not q.empty()
    with pytest.raises(queue.Full):
        q.put_nowait(4)
    with pytest.raises(queue.Full):
        q.put(4, timeout=0.1)
    with pytest.raises(queue.Full):
        q.put(4, False, -1)  # a timeout means nothing to a non-blocking call
    with pytest.raises(ValueError, match="non-negative"):
        q.put(4, timeout=-0.5)
    assert q.get() == 1 and q.get_nowait() == "two" and q.get(timeout=0.1) == [3]
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.1)
    with pytest.raises(queue.Empty):
        q.get(block=False)
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)
    assert queue.Full is shmem.Queue.put.__globals__["Full"]
    # A message larger than the ring: ValueError, nothing put, the queue still usable.
    with pytest.raises(ValueError, match="does not fit"):
        q.put(b"x" * 300)
    with pytest.raises(ValueError, match="does not fit"):
        q.send_bytes(bytes(249))
    with pytest.raises(ValueError, match="does not fit"):
        q.put_many([1, b"x" * 300])
    assert q.qsize() == 0 and q.empty()
    q.send_bytes(bytes(248))  # exactly the ring
    assert q.recv_bytes(timeout=1) == bytes(248)
    q.put("after")
    assert q.get() == "after"
    assert "capacity=256" in repr(q)
    q.join_thread()
    q.cancel_join_thread()
    q.close()
    q.close()
    assert q.name is None and "closed" in repr(q)
    for call in (lambda: q.put(1), q.get, q.get_nowait, lambda: q.put_nowait(1), q.qsize, q.empty):
        with pytest.raises(ValueError, match="closed"):
            call()
    with pytest.raises(ValueError, match="closed"):
        import pickle

        pickle.dumps(q)


def test_unbounded_queue_and_bad_arguments() -> None:
    with shmem.Queue(capacity=1024) as q:
        assert q.maxsize == 0 and not q.full()
        for i in range(30):
            q.put(i)
        assert not q.full()
        with pytest.raises(queue.Full):  # the ring's bytes are the limit
            for i in range(1000):
                q.put_nowait(i)
        assert [q.get() for _ in range(30)] == list(range(30))
        with pytest.raises(TypeError):
            q.get_many(1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            q.get_many(0)
    with pytest.raises(ValueError, match="capacity"):
        shmem.Queue(capacity=8)
    with pytest.raises(TypeError, match="capacity"):
        shmem.Queue(capacity="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="maxsize"):
        shmem.Queue(maxsize=1.0)  # type: ignore[arg-type]
    assert shmem.Queue(maxsize=-5).maxsize == 0


def test_simple_queue() -> None:
    q = shmem.SimpleQueue(capacity=512)
    assert q.empty()
    q.put({"a": 1})
    assert not q.empty()
    assert q.get() == {"a": 1}
    with pytest.raises(TypeError):
        q.put(1, False)  # type: ignore[call-arg]
    q.close()
    with pytest.raises(ValueError, match="closed"):
        q.get()


def test_joinable_queue_task_done_and_join() -> None:
    q = shmem.JoinableQueue()
    assert q.join(timeout=0.1) is True
    with pytest.raises(ValueError, match="too many"):
        q.task_done()
    for i in range(3):
        q.put(i)
    assert q.join(timeout=0.1) is False
    p = multiprocessing.get_context("fork").Process(target=workers.work_joinable, args=(q, 3))
    p.start()
    assert q.join(timeout=60) is True
    p.join(30)
    assert p.exitcode == 0 and q.empty()
    with pytest.raises(ValueError, match="too many"):
        q.task_done()
    q.close()


def test_fifo_over_many_wraps_of_a_small_ring() -> None:
    """A producer process and this consumer over a 256-byte ring: 0..200-byte
    messages, thousands of wraps, each got exactly once, in order."""
    n, seed = 3000, random.randrange(1 << 30)
    q = shmem.Queue(capacity=256)
    p = multiprocessing.get_context("fork").Process(target=workers.produce_sized, args=(q, seed, n))
    p.start()
    got = [q.recv_bytes(timeout=60) for _ in range(n)]
    p.join(30)
    assert p.exitcode == 0
    expected = list(workers.sized_payloads(seed, n))
    assert got == expected, f"seed {seed}"
    assert q.empty()
    head, tail, count = q._core.state()[:3]
    assert count == 0 and head == tail and tail > 20 * 256  # it did wrap, many times
    q.close()


# ------------------------------------------------------------------ 2. sharing


def test_passed_to_processes_under_every_start_method(mp_context: Any) -> None:
    q_in, q_out = shmem.Queue(), shmem.Queue()
    names = (q_in.name, q_out.name)
    procs = [mp_context.Process(target=workers.echo, args=(q_in, q_out, 5)) for _ in range(2)]
    for p in procs:
        p.start()
    for i in range(10):
        q_in.put(i)
    results = [q_out.get(timeout=60) for _ in range(10)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(v for _, v in results) == [i * 2 for i in range(10)]
    assert {pid for pid, _ in results} <= {p.pid for p in procs}
    q_in.close()
    q_out.close()
    assert wait_until(lambda: not set(names) & set(os.listdir(SHM_DIR)))


def test_passed_to_a_pool() -> None:
    q = shmem.Queue()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        answers = pool.starmap(workers.pool_put, [(q, i) for i in range(8)])
    assert {name for _, name in answers} == {q.name}
    assert sorted(q.get(timeout=10) for _ in range(8)) == [i * 10 for i in range(8)]
    name = q.name
    q.close()
    assert wait_until(lambda: name not in os.listdir(SHM_DIR))


def test_opened_by_name_from_an_unrelated_program(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    q = shmem.Queue(name=name, maxsize=7, capacity=4096)
    q.put("question")
    code = (
        "import sys, shmem\n"
        "q = shmem.Queue(name=sys.argv[1], capacity=64)\n"
        "assert (q.maxsize, q.capacity) == (7, 4096), (q.maxsize, q.capacity)\n"
        "q.put(q.get(timeout=30) + ' answered')\n"
        "q.send_bytes(memoryview(b'raw'))\n"
        "q.close()\n"
    )
    run = subprocess.run([PYTHON, "-c", code, name], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert q.get(timeout=10) == "question answered" and q.get(timeout=10) == b"raw"
    with pytest.raises(shmem.CorruptSegment, match=f"{name}.*shmem.Queue, not a JoinableQueue"):
        shmem.JoinableQueue(name=name)
    q.close()
    assert wait_until(lambda: name not in os.listdir(SHM_DIR))


# ------------------------------------------------------------------ 3. batches and bytes


def test_put_many_get_many_and_bytes() -> None:
    q = shmem.Queue(capacity=4096)
    q.put_many(range(5))
    q.put_many([])
    assert q.qsize() == 5
    assert q.get_many(3) == [0, 1, 2]
    assert q.get_many() == [3, 4]
    with pytest.raises(queue.Empty):
        q.get_many(block=False)
    with pytest.raises(queue.Empty):
        q.get_many(timeout=0.1)
    q.send_bytes(bytearray(b"ba"))
    q.send_bytes(memoryview(b"xmvx")[1:3])
    q.send_bytes(b"")
    q.send_bytes(memoryview(bytes(range(8))).cast("I"))  # not bytes-shaped: its bytes
    q.put(("pickled", 1))
    assert q.get() == b"ba"  # get() of a send_bytes message returns bytes
    assert q.recv_bytes() == b"mv"
    assert q.get_many(2) == [b"", bytes(range(8))]
    raw = q.recv_bytes()
    assert pickle.loads(raw) == ("pickled", 1)
    with pytest.raises(TypeError):
        q.send_bytes("text")
    big = [bytes([i]) * 1000 for i in range(10)]  # distinct: one pickle of them all is too large for a batch
    with pytest.raises(queue.Full):
        q.put_many(big, timeout=0.1)
    assert q.qsize() == 3  # those that fit were put, in order
    assert q.get_many(10) == big[:3]
    q.close()


def test_put_many_batches_come_out_one_by_one_exactly_once_to_every_kind_of_taker() -> None:
    """put_many puts up to 64 objects in one record; get, get_many, recv_bytes and
    other processes take them one at a time or several, each exactly once, in order."""
    q = shmem.Queue()
    other = shmem.Queue._attach(q.name)  # a second handle in this process: its own cache of a batch
    items = [(i, float(i), f"s{i}") for i in range(300)]
    q.put_many(items)
    assert q.qsize() == 300
    got = [q.get(), other.get(), q.get(), *q.get_many(5), other.get(), *other.get_many(70)]
    got.append(pickle.loads(q.recv_bytes()))  # an item of a batch comes as its own pickle
    got += q.get_many()
    assert got == items and q.empty()
    # consumers in other processes, each taking a few at a time, racing over the same batches
    q.put_many(list(range(2000)))
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=workers.take_counted, args=(q, results, seed)) for seed in range(3)]
    for proc in procs:
        proc.start()
    taken: List[int] = []
    for _ in procs:
        taken += results.get(timeout=60)
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert sorted(taken) == list(range(2000)), "an item lost or taken twice"
    other.close()
    q.close()


def test_an_item_got_from_a_batch_is_not_kept_alive_by_the_queue() -> None:
    q = shmem.Queue()
    q.put_many([workers.Tracked(i) for i in range(10)])
    first = q.get()
    ref = weakref.ref(first)
    del first
    assert ref() is None, "the queue's cache of the batch keeps a handed-out item alive"
    assert [t.n for t in q.get_many()] == list(range(1, 10))
    q.close()


def test_put_many_counts_items_for_maxsize_qsize_and_task_done() -> None:
    q = shmem.JoinableQueue(maxsize=5)
    q.put_many(range(5))
    assert q.qsize() == 5 and q.full()
    with pytest.raises(queue.Full):
        q.put_many([5, 6], timeout=0.05)
    assert q.get() == 0
    q.put(5)
    with pytest.raises(queue.Full):
        q.put_nowait(6)
    assert q.get_many() == [1, 2, 3, 4, 5]
    for _ in range(5):
        q.task_done()
    q.task_done()
    q.join()  # every one of the six items marked done
    with pytest.raises(ValueError):
        q.task_done()
    q.close()


def _ready(sel: Any, timeout: float) -> List[Any]:
    return [key.fileobj for key, _ in sel.select(timeout)]


def _eventually_not_ready(sel: Any) -> bool:
    """The watcher drains its pipe soon after the queue empties (it needs the GIL to)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not sel.select(0.05):
            return True
    return False


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the watcher threads: on purpose
def test_fileno_is_readable_while_the_queue_holds_an_item_for_selectors() -> None:
    import selectors

    q1, q2 = shmem.Queue(), shmem.Queue()
    sel = selectors.DefaultSelector()
    sel.register(q1, selectors.EVENT_READ)
    sel.register(q2, selectors.EVENT_READ)
    assert _ready(sel, 0.1) == []
    pid = fork_child(lambda: (time.sleep(0.2), q2.put("from a child")) and None)
    assert _ready(sel, 30) == [q2]  # woken by another process's put, q1 still quiet
    assert wait_exit(pid) == 0
    assert q2.get_nowait() == "from a child"
    assert _eventually_not_ready(sel), "still readable long after the queue emptied"
    q1.put_many([1, 2])
    assert _ready(sel, 30) == [q1]
    assert q1.get_many() == [1, 2]
    assert _eventually_not_ready(sel)
    fd = q1.fileno()
    assert q1.fileno() == fd  # one watcher per handle
    threads = [t for t in threading.enumerate() if t.name.startswith("shmem queue watcher")]
    assert len(threads) == 2
    sel.close()
    q1.close()
    q2.close()
    assert not any(t.is_alive() for t in threads), "close() left a watcher thread"
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with its queue (nothing else opened it since: one thread here)
    with pytest.raises(ValueError):
        q1.fileno()


def test_a_signal_handler_calling_fileno_while_the_main_thread_is_inside_it() -> None:
    """fileno() holds a lock while it starts the watcher: a handler calling it in between
    would wait for itself forever, unless signals are blocked there."""

    def body() -> None:
        q = shmem.Queue()
        calls = [0]

        def handler(signum: int, frame: Any) -> None:
            q.fileno()
            calls[0] += 1

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        try:
            deadline = time.monotonic() + 10
            while calls[0] < 300 and time.monotonic() < deadline:
                q.fileno()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert calls[0] >= 300, calls[0]
        watchers = [t for t in threading.enumerate() if t.name.startswith("shmem queue watcher")]
        assert len(watchers) == 1, watchers  # one per handle, however often it was asked
        q.put("x")
        assert q.get(timeout=10) == "x"
        q.close()

    pid = fork_child(body)
    assert wait_exit(pid, timeout=60) == 0


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the watcher thread: on purpose
def test_fileno_in_a_forked_child_watches_with_a_pipe_of_its_own() -> None:
    import selectors

    q = shmem.Queue()
    parent_pipe = os.fstat(q.fileno()).st_ino

    def child() -> None:
        fd = q.fileno()
        assert os.fstat(fd).st_ino != parent_pipe  # the parent's thread did not come along: a new watcher
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        assert sel.select(30), "the child's watcher never saw the parent's put"
        assert q.get_nowait() == "to the child"
        q.close()

    pid = fork_child(child)
    time.sleep(0.2)
    q.put("to the child")
    assert wait_exit(pid) == 0
    assert q.empty()
    q.close()


# ------------------------------------------------------------------ 4. crash safety


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_producer_sigkilled_at_random_instants(large: bool) -> None:
    """Killed anywhere in a put - large messages are copied with only the producers' mutex
    held - a producer leaves no torn message, and the queue works on."""
    q = shmem.Queue(capacity=(1 << 20) if large else 2048)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    rounds, kills, deadline = 0, 0, time.monotonic() + 4
    while rounds < 200 or (rounds < 2000 and time.monotonic() < deadline):
        rounds += 1
        pid = fork_child(lambda: workers.put_forever(q, rng.randrange(1 << 30), large))
        time.sleep(rng.random() * (0.01 if large else 0.002))
        kill_and_reap(pid)
        kills += 1
        expected = 0
        for data in drain(q):
            got = workers.check(data)
            assert got is not None, f"a torn message after a kill (seed {seed}, round {rounds})"
            assert got == (pid, expected), f"lost or duplicated message (seed {seed}): {got} != {(pid, expected)}"
            expected += 1
        assert mutex_word(q) == 0
    q.put("fresh")
    assert q.get(timeout=10) == "fresh" and q.empty()
    assert q._core.state()[2] == 0
    q.close()


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_consumer_sigkilled_at_random_instants(large: bool) -> None:
    """Killed anywhere in a get - large messages are copied out with only the consumers'
    mutex held - a consumer loses at most the message it was taking, and holds no lock."""
    q = shmem.Queue(capacity=(8 << 20) if large else (1 << 20))
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    r, w = os.pipe()
    reported: List[int] = []
    seq, kills, deadline = 0, 0, time.monotonic() + 4
    try:
        while kills < 200 or (kills < 600 and time.monotonic() < deadline):
            if kills % 2:
                q.put_many([workers.message(0, seq + i, rng, 100) for i in range(8)])
            elif large:  # a large message between small ones
                for i in range(8):
                    q.send_bytes(workers.message(0, seq + i, rng, *(workers.LARGE[::-1] if i % 3 == 1 else (100,))))
            else:
                for i in range(8):
                    q.send_bytes(workers.message(0, seq + i, rng, 100))
            seq += 8
            assert mutex_word(q) == 0, "a lock stayed held"
            pid = fork_child(lambda: workers.get_forever(q, w))
            time.sleep(rng.random() * (0.004 if large else 0.0015))
            kill_and_reap(pid)
            kills += 1
            got = read_all(r)
            reported.extend(struct.unpack(f"<{len(got) // 4}I", got))
            if q.qsize() > 32:  # the consumers fell behind (the pure-Python twin's do): take some
                for data in drain(q):
                    checked = workers.check(data)
                    reported.append(0xFFFFFFFF if checked is None else checked[1])
    finally:
        os.close(w)
    os.close(r)
    assert 0xFFFFFFFF not in reported, f"a torn message (seed {seed})"
    rest = []
    for data in drain(q):
        got = workers.check(data)
        assert got is not None, f"a torn message (seed {seed})"
        rest.append(got[1])
    taken = reported + rest
    assert taken == sorted(taken), "out of order"
    assert len(set(taken)) == len(taken), f"duplicated messages (seed {seed})"
    lost = set(range(seq)) - set(taken)
    assert len(lost) <= kills, f"{len(lost)} messages lost in {kills} kills (seed {seed})"
    q.put("fresh")
    assert q.get(timeout=10) == "fresh"
    q.close()


def test_holder_of_the_internal_mutex_sigkilled() -> None:
    """A process dies holding the queue's mutex after scribbling a wrong count: the
    next put and get take it over, recount the ring and work."""
    q = shmem.Queue(capacity=1024, maxsize=3)
    q.put_many(["a", "b"])

    def hold() -> None:
        calls = sync_wait.calls(q._block.mapping)
        calls.lock(0)
        struct.pack_into("<Q", q._block.mapping, queue_layout.OFF_COUNT, 3)  # a half-done change

    pid = hold_in_child(hold)
    assert mutex_word(q) != 0
    kill_and_reap(pid)
    q.put("c", timeout=10)  # the count was repaired: 2 items, room for a third
    assert q.qsize() == 3 and mutex_word(q) == 0
    assert q.get_many(5, timeout=10) == ["a", "b", "c"]
    q.close()


@pytest.mark.parametrize("side", ["producers", "consumers"])
def test_holder_of_a_side_mutex_sigkilled(side: str) -> None:
    """A process dies holding the producers' (or consumers') mutex - as a producer killed while
    it copies a large record, with a half-written record past the tail: no one ever sees that
    record, and the next put and get take the mutex over and work."""
    q = shmem.Queue(capacity=1 << 18)
    q.put_many(["a", "b"])
    off = queue_layout.OFF_PUT_MUTEX if side == "producers" else queue_layout.OFF_GET_MUTEX

    def hold() -> None:
        calls = sync_wait.calls(q._block.mapping)
        calls.lock(off)
        busy = off + queue_layout.BUSY_AFTER_MUTEX  # as a copier sets it, under the ring's mutex
        calls.lock(0)
        struct.pack_into("<I", q._block.mapping, busy, 1)
        calls.unlock(0)
        if side == "producers":  # a record written past the tail, never committed
            tail = struct.unpack_from("<Q", q._block.mapping, queue_layout.OFF_TAIL)[0]
            at = queue_layout.RING + tail % (1 << 18)
            struct.pack_into("<II", q._block.mapping, at, 100_000, queue_layout.TAG_BYTES)
            q._block.mapping[at + 8 : at + 8 + 1000] = b"x" * 1000

    pid = hold_in_child(hold)
    assert mutex_word(q) != 0
    kill_and_reap(pid)
    q.put("d0", timeout=10)  # small: finds the side busy, takes the dead holder's mutex over
    q.send_bytes(b"c" * 100_000, timeout=10)  # a large record: copied without the ring's mutex
    q.put("d", timeout=10)
    assert q.get_many(3, timeout=10) == ["a", "b", "d0"]
    assert q.recv_bytes(timeout=10) == b"c" * 100_000 and q.get(timeout=10) == "d"
    assert q.empty() and mutex_word(q) == 0
    for busy in (queue_layout.OFF_PUT_MUTEX, queue_layout.OFF_GET_MUTEX):
        assert struct.unpack_from("<I", q._block.mapping, busy + queue_layout.BUSY_AFTER_MUTEX)[0] == 0
    q.close()


def test_nowait_calls_do_not_wait_for_a_waiter_on_their_side() -> None:
    """A producer waiting for room lets go of the producers' mutex, a consumer waiting for an
    item of the consumers': put_nowait and get_nowait answer at once meanwhile, and the waiters
    still get their turn."""
    q = shmem.Queue(maxsize=1)
    q.put(1)
    waiter = threading.Thread(target=lambda: q.put(2, timeout=60))
    waiter.start()
    assert wait_until(lambda: q._core.state()[5] >= 1, 10), "the thread never slept in put()"
    started = time.monotonic()
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    assert time.monotonic() - started < 10, "put_nowait waited for the producer asleep in put()"
    assert q.get(timeout=10) == 1
    waiter.join(30)
    assert not waiter.is_alive() and q.get(timeout=10) == 2

    got: List[Any] = []
    waiter = threading.Thread(target=lambda: got.append(q.get(timeout=60)))
    waiter.start()
    assert wait_until(lambda: q._core.state()[4] >= 1, 10), "the thread never slept in get()"
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert time.monotonic() - started < 10, "get_nowait waited for the consumer asleep in get()"
    q.put(4)
    waiter.join(30)
    assert not waiter.is_alive() and got == [4] and q.empty()
    q.close()


# ------------------------------------------------------------------ 5. signal handlers


@pytest.mark.parametrize("filler", [0, 100_000], ids=["small", "large"])
def test_a_signal_handler_puts_while_the_main_thread_puts_and_gets(filler: int) -> None:
    """Handlers fire every 0.2 ms and put; the main thread's own items (large ones are copied
    with only a side mutex held) all arrive, and so does every handler's, once."""
    q = shmem.Queue(capacity=4 << 20)
    big = b"f" * filler
    fired = [0]
    numbers = itertools.count(1)
    depth = [0]
    not_put: List[int] = []

    def handler(signum: int, frame: Any) -> None:
        # CPython may run a handler inside another (a signal during the first's Python code):
        # next() hands each one its own number, so nested puts may come out of order, never twice.
        # Nested four deep, a handler puts nothing: when a put takes longer than the timer's
        # period (the pure-Python path on a busy machine), handlers would nest without end, up
        # to a RecursionError.
        n = next(numbers)
        fired[0] = max(fired[0], n)
        if depth[0] >= 4:
            not_put.append(n)
            return
        depth[0] += 1
        try:
            q.put(("sig", n))
        finally:
            depth[0] -= 1

    old = signal.signal(signal.SIGALRM, handler)
    got_sig: List[int] = []
    main_put = main_got = 0
    deadline = time.monotonic() + 60
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        while fired[0] < 1000 and time.monotonic() < deadline:
            q.put(("main", main_put, big))
            main_put += 1
            while True:  # up to our own item: what is left is the handlers', a few at most
                kind, value, *rest = q.get(timeout=10)
                if kind == "sig":
                    got_sig.append(value)
                    continue
                assert rest == [big] and value == main_got
                main_got += 1
                break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    for kind, value, *_rest in q.get_many(1 << 20, block=False) if not q.empty() else []:
        if kind == "sig":
            got_sig.append(value)
        else:
            main_got += 1
    assert fired[0] >= 1000
    missing = set(range(1, fired[0] + 1)) - set(got_sig) - set(not_put)
    twice = len(got_sig) - len(set(got_sig))
    assert not missing and not twice and len(got_sig) + len(not_put) == fired[0], (
        f"of {fired[0]} handlers' items, missing {sorted(missing)[:20]}, got twice {twice}, "
        f"not put (nested too deep) {len(not_put)}"
    )
    assert main_got == main_put
    q.close()


# ------------------------------------------------------------------ 6. fork


def test_fork_while_another_thread_is_blocked_in_get() -> None:
    q = shmem.Queue()
    for i in range(5):
        got: List[Any] = []
        t = threading.Thread(target=lambda: got.append(q.get(timeout=60)))
        t.start()
        assert wait_until(lambda: q._core.state()[4] >= 1, 10), "the thread never slept in get()"

        def child(i: int = i) -> None:
            q.put(("for the thread", i))
            assert wait_until(lambda: q.empty(), 10)
            q.put_many(["x", i])
            assert q.get(timeout=10) == "x" and q.get_many(5, timeout=10) == [i]
            q.close()

        pid = fork_threaded_child(child)
        assert wait_exit(pid) == 0
        t.join(30)
        assert not t.is_alive() and got == [("for the thread", i)]
    assert q.empty()
    q.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the threads: on purpose
def test_fork_while_other_threads_copy_large_records_in_and_out() -> None:
    """Children forked while this process's threads hold the producers' or the consumers'
    mutex in the middle of a large copy: the children's puts and gets wait for those copies,
    then go through; nothing is lost, torn or taken twice."""
    q = shmem.Queue(capacity=1 << 20)
    big = [bytes([i]) * 100_000 for i in range(8)]
    stop = threading.Event()
    taken: List[bytes] = []

    def produce() -> None:
        i = 0
        while not stop.is_set():
            q.send_bytes(big[i % 8], timeout=30)
            i += 1

    def consume() -> None:
        while not stop.is_set():
            try:
                taken.append(q.recv_bytes(timeout=0.2))
            except queue.Empty:
                pass

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    r, w = os.pipe()
    try:
        for i in range(10):

            def child(i: int = i) -> None:
                q.send_bytes(b"child %d " % i + bytes(100_000), timeout=30)
                q.send_bytes(b"small %d" % i, timeout=30)
                got = q.recv_bytes(timeout=30)
                os.write(w, struct.pack("<I", len(got)) + got[:16])  # enough to tell which it was
                q.close()

            pid = fork_threaded_child(child)
            assert wait_exit(pid) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        os.close(w)
    assert not any(t.is_alive() for t in threads)
    taken += drain(q)
    reported = read_all(r)
    os.close(r)
    seen = [(len(data), data[:16]) for data in taken]
    while reported:
        (length,) = struct.unpack_from("<I", reported)
        seen.append((length, reported[4 : 4 + min(length, 16)]))
        reported = reported[4 + min(length, 16) :]
    assert all(data in big for data in taken if len(data) == 100_000)
    for i in range(10):  # each child's two messages, intact, exactly once
        large = b"child %d " % i
        assert seen.count((len(large) + 100_000, (large + bytes(16))[:16])) == 1
        assert seen.count((len(b"small %d" % i), b"small %d" % i)) == 1
    assert mutex_word(q) == 0
    q.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the threads: on purpose
def test_close_while_other_threads_wait_inside_put_get_and_join() -> None:
    """close() while other threads are asleep inside put, get and join (the GIL released): the
    mapping stays until the last of them is out, and each raises ValueError at once instead
    of touching unmapped memory (this was a segfault). In a child: a crash fails the test."""

    def body() -> List[str]:
        q = shmem.JoinableQueue(maxsize=1)
        q.put(0)  # full, and one unfinished task
        other = shmem.JoinableQueue(name=q.name)  # a second handle: the queue outlives the first
        results: List[str] = []

        def run(call: Callable[[], Any]) -> None:
            try:
                call()
                results.append("returned")
            except Exception as err:
                results.append(f"{type(err).__name__}: {err}")

        empty = shmem.Queue()
        calls = [lambda: q.put(1, timeout=30), lambda: q._core.join(30 * 10**9), lambda: empty.get(timeout=30)]
        threads = [threading.Thread(target=run, args=(c,)) for c in calls]
        for t in threads:
            t.start()
        assert wait_until(lambda: q._core.state()[5] >= 1 and empty._core.state()[4] >= 1, 10)
        time.sleep(0.2)  # and join asleep too
        started = time.monotonic()
        q.close()
        empty.close()
        for t in threads:
            t.join(20)
        assert time.monotonic() - started < 15 and not any(t.is_alive() for t in threads)
        assert other.get(timeout=10) == 0  # the other handle is untouched
        other.close()
        with pytest.raises(ValueError, match="closed"):
            q.put(2)
        return sorted(results)

    got = in_child(body, timeout=60)
    assert got == ["ValueError: the queue was closed while this call waited"] * 3


# ------------------------------------------------------------------ 7. closed descriptors

CLOSERANGE_CHILD = r"""
import json, os, shmem, sys
q = shmem.Queue(capacity=4096)
q.put("before")
q.fileno()  # a watcher thread and its pipe, whose numbers closerange frees for others
os.closerange(3, 1024)
# Fill the low descriptors with files of ours: a stale fd the queue kept would hit them.
paths = [os.path.join(sys.argv[1], f"f{i}") for i in range(16)]
fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
r, w = os.pipe()
out = {"first": q.get(timeout=10)}
q.put_many(list(range(50)))
q.send_bytes(b"bytes")
out["many"] = q.get_many(50, timeout=10) == list(range(50))
out["bytes"] = q.recv_bytes(timeout=10) == b"bytes"
q2 = shmem.Queue()  # and a new queue after the purge
q2.put(1)
out["q2"] = q2.get(timeout=10)
import selectors
fd = q.fileno()  # a new pipe: the old one's numbers are other files' now
q.put("sel")
sel = selectors.DefaultSelector()
sel.register(fd, selectors.EVENT_READ)
out["select"] = bool(sel.select(10)) and q.get_nowait() == "sel"
sel.close()
name = q.name
q.close()
q2.close()
os.close(w)
out["pipe"] = os.read(r, 100).decode()
out["sizes"] = [os.fstat(fd).st_size for fd in fds]
print(json.dumps(out))
"""


def test_the_queue_survives_closerange_and_writes_no_unrelated_fd(tmp_path: Any) -> None:
    run = subprocess.run([PYTHON, "-c", CLOSERANGE_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {
        "first": "before",
        "many": True,
        "bytes": True,
        "q2": 1,
        "select": True,
        "pipe": "",
        "sizes": [0] * 16,
    }


# ------------------------------------------------------------------ 8. hostile blocks


@pytest.mark.parametrize(
    "damage",
    [
        (queue_layout.OFF_HEAD, struct.pack("<Q", 3)),  # misaligned
        (queue_layout.OFF_TAIL, struct.pack("<Q", 1 << 40)),  # tail far past head
        (queue_layout.OFF_HEAD, struct.pack("<QQ", 0xFFFFFFFFFFFFFFF8, 0x1000)),
        (queue_layout.RING, struct.pack("<II", 0x7FFFFFF0, 1)),  # a record longer than the ring
        (queue_layout.RING, struct.pack("<II", 512, 0xFFFFFFFF)),  # a wrap record mid-ring
        (queue_layout.RING + queue_layout.REC, struct.pack("<II", 0, 0)),  # a batch of no items
        (queue_layout.RING + queue_layout.REC, struct.pack("<II", 2, 2)),  # a batch taken whole, still there
        (queue_layout.RING + queue_layout.REC, struct.pack("<II", 3, 0)),  # 3 items announced, 2 pickled
    ],
    ids=[
        "misaligned-head",
        "far-tail",
        "wrapped-ends",
        "long-record",
        "early-wrap",
        "empty-batch",
        "taken-batch",
        "short-batch",
    ],
)
def test_damaged_control_words_raise_corrupt_segment(damage: Tuple[int, bytes]) -> None:
    q = shmem.Queue(capacity=1024)
    q.put_many(["a", "b"])
    other = shmem.SharedMemory(q.name)
    assert other.buf is not None
    offset, data = damage
    other.buf[offset : offset + len(data)] = data
    if offset >= queue_layout.RING:
        with pytest.raises(shmem.CorruptSegment):
            q.get_nowait()
    else:
        for call in (q.get_nowait, lambda: q.put("c"), lambda: q.get_many(3), lambda: q.put_many([1])):
            with pytest.raises(shmem.CorruptSegment) as info:
                call()
            assert isinstance(info.value, ValueError) and "damaged" in str(info.value)
    assert mutex_word(q) == 0
    other.close()
    q.close()


def test_busy_words_scribbled_by_another_process_heal() -> None:
    """A busy word is only a hint to take a side's mutex: garbage in one costs small puts and
    gets that detour once, and whoever holds the side's mutex clears it."""
    q = shmem.Queue(capacity=1 << 18)
    for side in (queue_layout.OFF_PUT_MUTEX, queue_layout.OFF_GET_MUTEX):
        q._block.mapping[side + queue_layout.BUSY_AFTER_MUTEX : side + queue_layout.BUSY_AFTER_MUTEX + 4] = b"\xff" * 4
    q.put("small", timeout=10)
    q.send_bytes(b"L" * 100_000, timeout=10)
    assert q.get(timeout=10) == "small" and q.recv_bytes(timeout=10) == b"L" * 100_000
    for side in (queue_layout.OFF_PUT_MUTEX, queue_layout.OFF_GET_MUTEX):
        assert struct.unpack_from("<I", q._block.mapping, side + queue_layout.BUSY_AFTER_MUTEX)[0] == 0
    assert q.empty() and mutex_word(q) == 0
    q.close()


def test_a_name_that_is_not_a_queue_is_refused_naming_it(shm_name: Callable[[], str]) -> None:
    raw = shmem.SharedMemory(shm_name(), create=True, size=4096)
    lock = shmem.Lock()
    jq = shmem.JoinableQueue()
    try:
        for name, what in ((raw.name, "raw block"), (lock.name, "lock"), (jq.name, "JoinableQueue")):
            with pytest.raises(ValueError, match=f"{name}.*{what}"):
                shmem.Queue(name=name)
        with pytest.raises(shmem.CorruptSegment, match=f"{lock.name}"):
            shmem.SimpleQueue(name=lock.name)
    finally:
        raw.close()
        raw.unlink()
        lock.close()
        jq.close()


# ------------------------------------------------------------------ 9. full /dev/shm

FULL_CHILD = r"""
import json, os, shmem
out = {}
try:
    shmem.Queue(capacity=4 << 20)
except OSError as err:
    out["error"] = [type(err).__name__, isinstance(err, shmem.NoSpace)]
out["left"] = sorted(os.listdir("/dev/shm"))
q = shmem.Queue(capacity=64 << 10)  # a queue that fits works
q.send_bytes(bytes(60 << 10))
out["fits"] = len(q.recv_bytes())
q.close()
print(json.dumps(out))
"""


def test_a_full_dev_shm_raises_no_space(private_shm_available: None) -> None:  # noqa: F811
    out = run_in_private_shm(FULL_CHILD)
    assert out == {"error": ["NoSpace", True], "left": [], "fits": 60 << 10}


# ------------------------------------------------------------------ 10. the pure-Python twin


def _parity_script(core: Any, mapping: Any) -> List[Any]:
    out: List[Any] = []

    def step(fn: Callable[[], Any]) -> None:
        try:
            out.append(fn())
        except Exception as err:
            out.append(type(err).__name__)

    step(lambda: core.get(0))
    for i in range(12):
        step(lambda i=i: core.put(bytes([i]) * (i * 7), 1 + i % 2, 0))
    step(lambda: core.qsize())
    step(lambda: core.get_many(5, 0))
    step(lambda: core.put_many([b"a" * 40, b"b" * 90, b"c" * 200], 2, 0))
    step(lambda: core.put(b"z" * 300, 1, 0))  # too big
    step(lambda: core.put_many([b"ok", b"z" * 300], 1, 0))
    step(lambda: core.put_many((b"x",), 1, 0))
    step(lambda: core.put("str", 1, 0))
    step(lambda: core.get_many(100, 0))
    # batch records: n items in one record, taken a few at a time
    step(lambda: core.put_batch(pickle.dumps(list(range(5))), 5, 0))
    step(lambda: core.put_batch(pickle.dumps(["x"] * 3), 3, 0))
    step(lambda: core.put_batch(b"", 0, 0))  # no items
    step(lambda: core.put_batch(b"z" * 300, 2, 0))  # too big
    step(lambda: core.put_batch(queue_plain.encode([7, "x", None]), 3, 0, True))  # a plain batch
    step(lambda: core.qsize())
    step(lambda: core.get(0))
    step(lambda: core.get_many(2, 0))
    step(lambda: core.get_objs(3, 0))
    step(lambda: core.qsize())
    step(lambda: core.get_objs(10, 0))
    step(lambda: core.get(1000))
    step(lambda: core.task_done())
    step(lambda: core.join(0))
    step(lambda: core.state())
    struct.pack_into("<Q", mapping, queue_layout.OFF_TAIL, 12345)
    step(lambda: core.get(0))
    step(lambda: core.put(b"1", 1, 0))
    core.release()
    step(lambda: core.get(0))
    return out


def _parity_large_script(core: Any, mapping: Any) -> List[Any]:
    """Records of BIG_COPY bytes or more (C copies them with only a side mutex held) through
    a 256 KiB ring: a full ring, takes that stop at a large record, a restart at offset 0."""
    out: List[Any] = []

    def step(fn: Callable[[], Any]) -> None:
        try:
            got = fn()
            out.append(
                [(x[0], len(x[1]), bytes(x[1][:1])) if isinstance(x, tuple) else x for x in got]
                if isinstance(got, list)
                else got
            )
        except Exception as err:
            out.append(type(err).__name__)

    for i in range(4):  # the fourth finds no room
        step(lambda i=i: core.put(bytes([i]) * 70_000, 2, 0))
    step(lambda: core.put(b"s" * 10, 2, 0))
    for _ in range(5):  # each large record comes alone; the small one after them
        step(lambda: core.get_many(10, 0))
    step(lambda: core.put(b"r" * 200_000, 2, 0))  # an empty ring restarts at offset 0
    step(lambda: core.put_many([b"a" * 100, b"b" * 70_000], 2, 0))  # only the first fits
    step(lambda: core.state())
    step(lambda: core.get_objs(10, 0))
    step(lambda: core.get_objs(10, 0))
    step(lambda: core.put(b"z" * 300_000, 2, 0))  # too big
    step(lambda: core.qsize())
    core.release()
    return out


@pytest.mark.skipif(PURE, reason="needs the C ring")
def test_c_ring_and_pure_python_twin_agree() -> None:
    from shmem import _queue

    results = []
    for cls in (_queue.QueueCore, queue_ring.PyRingCore):
        shm = shmem.SharedMemory(create=True, size=queue_layout.data_size(256))
        assert shm.buf is not None
        shm.buf[: queue_layout.RING] = queue_layout.initial()
        mapping = shm._block.mapping
        results.append(_parity_script(cls(mapping, 256, 0, False), mapping))
        shm.close()
        shm.unlink()
    assert results[0] == results[1]
    assert "CorruptSegment" in results[0] and "ValueError" in results[0]

    assert _queue.BIG_COPY == queue_layout.BIG_COPY and _queue.RING == queue_layout.RING
    results = []
    for cls in (_queue.QueueCore, queue_ring.PyRingCore):
        shm = shmem.SharedMemory(create=True, size=queue_layout.data_size(1 << 18))
        assert shm.buf is not None
        shm.buf[: queue_layout.RING] = queue_layout.initial()
        results.append(_parity_large_script(cls(shm._block.mapping, 1 << 18, 0, False), shm._block.mapping))
        shm.close()
        shm.unlink()
    assert results[0] == results[1], results
    assert results[0][3] is False and results[0][5:7] == [[(2, 70_000, b"\0")], [(2, 70_000, b"\1")]]


MIXED_CHILD = r"""
import json, random, sys, threading
sys.path.insert(0, sys.argv[2])
import _queue_workers as workers
import shmem
from shmem._kinds import queue_ring
assert queue_ring.RingCore is queue_ring.PyRingCore, "not the pure-Python twin"
q = shmem.Queue(name=sys.argv[1])
rng = random.Random(int(sys.argv[3]))
def send():
    for i in range(60):
        q.send_bytes(workers.message(1, i, rng, *(workers.LARGE[::-1] if i % 2 else (200,))), timeout=60)
sender = threading.Thread(target=send)
sender.start()
got = [workers.check(q.recv_bytes(timeout=60)) for _ in range(60)]
sender.join()
q.close()
print(json.dumps(got))
"""


@pytest.mark.skipif(PURE, reason="needs the C ring")
def test_c_and_pure_python_processes_share_one_queue(shm_name: Callable[[], str]) -> None:
    """The C ring and its twin follow one protocol (three mutexes, one lock order): a
    pure-Python process and this one each put 60 large and small messages and take 60, all
    at once. Every message is taken once, intact, and in its producer's order."""
    name = shm_name()
    q = shmem.Queue(name=name, capacity=1 << 20)
    seed = random.randrange(1 << 30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMEM_")}
    env["SHMEM_PURE_PYTHON"] = "1"
    child = subprocess.Popen(
        [PYTHON, "-c", MIXED_CHILD, name, os.path.dirname(os.path.abspath(__file__)), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    mine: List[Any] = []
    taker = threading.Thread(target=lambda: mine.extend(workers.check(q.recv_bytes(timeout=60)) for _ in range(60)))
    taker.start()
    rng = random.Random(seed + 1)
    try:
        for i in range(60):
            q.send_bytes(workers.message(2, i, rng, *(workers.LARGE[::-1] if i % 3 else (200,))), timeout=60)
    finally:
        taker.join(120)
        out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    theirs = [tuple(got) for got in json.loads(out)]
    assert None not in mine and sorted(mine + theirs) == [(p, i) for p in (1, 2) for i in range(60)]
    for taken in (mine, theirs):
        for producer in (1, 2):
            seqs = [i for p, i in taken if p == producer]
            assert seqs == sorted(seqs), "out of its producer's order"
    assert q.empty()
    q.close()


CORE = [
    "test_numpy_arrays_travel_beside_their_pickle_and_arrive_writable",
    "test_a_damaged_out_of_band_record_is_corrupt_segment",
    "test_arrays_of_every_kind_arrive_as_pickle_would_give_them_twice_over",
    "test_implementation_follows_the_environment",
    "test_put_get_nowait_timeouts_maxsize_and_sizes",
    "test_unbounded_queue_and_bad_arguments",
    "test_simple_queue",
    "test_joinable_queue_task_done_and_join",
    "test_fifo_over_many_wraps_of_a_small_ring",
    "test_put_many_get_many_and_bytes",
    "test_put_many_batches_come_out_one_by_one_exactly_once_to_every_kind_of_taker",
    "test_an_item_got_from_a_batch_is_not_kept_alive_by_the_queue",
    "test_put_many_counts_items_for_maxsize_qsize_and_task_done",
    "test_fileno_is_readable_while_the_queue_holds_an_item_for_selectors",
    "test_fileno_in_a_forked_child_watches_with_a_pipe_of_its_own",
    "test_a_signal_handler_calling_fileno_while_the_main_thread_is_inside_it",
    "test_aio_get_waiters_share_the_queues_descriptor_and_each_gets_an_item",
    "test_producer_sigkilled_at_random_instants",
    "test_consumer_sigkilled_at_random_instants",
    "test_holder_of_the_internal_mutex_sigkilled",
    "test_holder_of_a_side_mutex_sigkilled",
    "test_nowait_calls_do_not_wait_for_a_waiter_on_their_side",
    "test_a_signal_handler_puts_while_the_main_thread_puts_and_gets",
    "test_fork_while_another_thread_is_blocked_in_get",
    "test_fork_while_other_threads_copy_large_records_in_and_out",
    "test_close_while_other_threads_wait_inside_put_get_and_join",
    "test_damaged_control_words_raise_corrupt_segment",
    "test_busy_words_scribbled_by_another_process_heal",
]


@pytest.mark.slow
@pytest.mark.skipif(PURE or not lock_layout.ACCELERATED, reason="this run is the pure-Python path already")
def test_pure_python_path_passes_the_core_tests() -> None:
    run = run_pure_python(__file__, " or ".join(CORE))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.split("\n")[-2]


# ------------------------------------------------------------------ the listing


def test_shmem_ls_and_info_show_a_queues_fill_level() -> None:
    q = shmem.JoinableQueue(maxsize=5, capacity=4096)
    q.put_many([1, 2])
    q.send_bytes(b"x" * 100)
    listed = subprocess.run([PYTHON, "-m", "shmem", "ls", "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    (record,) = [r for r in json.loads(listed.stdout) if r["name"] == q.name]
    assert record["kind"] == "queue" and record["type"] == "JoinableQueue"
    assert (record["capacity"], record["maxsize"], record["items"], record["unfinished"]) == (4096, 5, 3, 3)
    # put_many's two items: one batch record (its head, its counts, one pickle of [1, 2]); then 100 bytes.
    used = queue_layout.record_size(queue_layout.BATCH_HEAD + len(pickle.dumps([1, 2], 5))) + 112
    assert record["used_bytes"] == used
    info = subprocess.run([PYTHON, "-m", "shmem", "info", q.name], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and f"3 ({used} bytes of the ring)" in info.stdout, info.stdout
    # A damaged control word: the listing says so and goes on, never a traceback.
    other = shmem.SharedMemory(q.name)
    assert other.buf is not None
    other.buf[queue_layout.OFF_TAIL : queue_layout.OFF_TAIL + 8] = struct.pack("<Q", 1 << 50)
    listed = subprocess.run([PYTHON, "-m", "shmem", "ls"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "state unreadable" in listed.stdout, listed.stdout + listed.stderr
    other.close()
    q.close()


# ------------------------------------------------------------------ asyncio


def test_aio_get_and_put_wait_in_the_event_loop_not_in_a_thread() -> None:
    import asyncio

    import shmem.aio

    q = shmem.Queue(maxsize=1)
    ctx = multiprocessing.get_context("spawn")
    producer = ctx.Process(target=workers.put_later, args=(q, "hello", 0.3))

    async def main() -> Tuple[Any, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.ensure_future(ticker())
        producer.start()
        got = await shmem.aio.get(q, timeout=60)
        await shmem.aio.put(q, 1)
        with pytest.raises(queue.Full):
            await shmem.aio.put(q, 2, timeout=0.05)
        assert await shmem.aio.get(q, timeout=0) == 1
        with pytest.raises(queue.Empty):
            await shmem.aio.get(q, timeout=0.05)
        with pytest.raises(ValueError):
            await shmem.aio.get(q, timeout=-1)
        with pytest.raises(TypeError):
            await shmem.aio.get(object())  # type: ignore[arg-type]
        beat.cancel()
        return got, ticks

    got, ticks = asyncio.run(main())
    producer.join(60)
    assert got == "hello" and producer.exitcode == 0
    assert ticks >= 5, "the event loop did not run while get() waited"
    q.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the queue's watcher thread
def test_aio_get_waiters_share_the_queues_descriptor_and_each_gets_an_item() -> None:
    """Several coroutines of one loop wait on one queue: a loop keeps one reader per
    descriptor, so a waiter that replaced another's would leave it asleep until its timeout."""
    import asyncio

    import shmem.aio

    q = shmem.Queue()

    async def main() -> List[Any]:
        waiters = [asyncio.ensure_future(shmem.aio.get(q, timeout=60)) for _ in range(3)]
        await asyncio.sleep(0.1)  # all three asleep on the descriptor
        pid = fork_child(lambda: q.put_many(["a", "b", "c"]))
        got = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert wait_exit(pid) == 0
        assert not shmem.aio._readers, "a reader was left registered"
        return got

    assert sorted(asyncio.run(main())) == ["a", "b", "c"]
    q.close()


# ------------------------------------------------------------------ arrays out of band


def test_numpy_arrays_travel_beside_their_pickle_and_arrive_writable() -> None:
    np = pytest.importorskip("numpy")
    q = shmem.Queue(capacity=4 << 20)
    a = np.arange(1 << 16, dtype=np.float64)
    q.put(a)
    got = q.get()
    assert np.array_equal(got, a) and got.flags.writeable and got.dtype == a.dtype
    got[0] = -1.0  # its own memory: the sender's array is untouched
    assert a[0] == 0.0
    q.put_many([(a, "tagged"), a[::2], np.zeros((3, 4), order="F")])
    (pair, strided, fortran) = q.get_many(3, timeout=10)
    assert np.array_equal(pair[0], a) and pair[1] == "tagged"
    assert np.array_equal(strided, a[::2])  # not contiguous: pickled in-band, same result
    assert fortran.shape == (3, 4) and fortran.flags.f_contiguous
    q.put(a)
    raw = q.recv_bytes()  # an array's record, as bytes
    assert isinstance(raw, bytes) and a.tobytes() in raw
    with pytest.raises(ValueError):
        q.put(np.zeros(1 << 20))  # 8 MiB into a 4 MiB ring: refused, nothing put
    assert q.empty()
    q.close()


def test_arrays_of_every_kind_arrive_as_pickle_would_give_them_twice_over() -> None:
    """Each process remembers the pickles of plain arrays by dtype and shape, and what
    pickles it undid: a second array of the same kind, and a record a cache does not fit,
    must come out exactly as pickle makes them."""
    np = pytest.importorskip("numpy")
    q = shmem.Queue(capacity=1 << 20)
    structured = np.dtype([("x", "<i4"), ("y", "<f8")])
    with_meta = np.dtype("f8", metadata={"unit": "m"})
    arrays = [
        np.arange(100, dtype=np.float64),
        np.arange(12, dtype="<i4").reshape(3, 4),
        np.arange(12, dtype=">i4").reshape(4, 3),
        np.ones((3, 4), order="F"),
        np.ones((1, 5)),
        np.array(7.5),
        np.zeros(0),
        np.array([True, False]),
        np.array(["ab", "cde"]),
        np.array([0, 1, 2], dtype="datetime64[s]"),
        np.array([0, 1, 2], dtype="datetime64[ns]"),
        np.array([1 + 2j]),
        np.zeros(2, dtype=structured),
        np.zeros(3, dtype=with_meta),
        np.arange(6.0).reshape(2, 3)[:, 1:],  # not contiguous
        np.array([1, "x", None], dtype=object),
    ]
    for _round in range(3):
        for a in arrays:
            q.put(a)
            got = q.get(timeout=10)
            want = pickle.loads(pickle.dumps(a, 5))
            assert type(got) is type(want) and got.dtype == want.dtype and got.shape == want.shape
            assert got.dtype.metadata == want.dtype.metadata
            assert got.flags.c_contiguous == want.flags.c_contiguous
            assert got.flags.f_contiguous == want.flags.f_contiguous
            assert np.array_equal(got, want) or a.dtype.kind == "c" and got.tobytes() == want.tobytes()
            assert got.flags.writeable
    # A record whose pickle the consumer knows, with a buffer of another length: not the cached
    # layout's array - pickle's own answer (here NumPy's ValueError), as without the cache.
    a = np.arange(8, dtype=np.float64)
    q.put(a)
    assert np.array_equal(q.get(timeout=10), a)
    parts = queue_ring.oob_parts(a)
    assert isinstance(parts, list)
    payload = bytearray(b"".join(bytes(p) for p in parts))
    struct.pack_into("<Q", payload, 16, 32)  # the buffer's length: 4 float64s, not 8...
    with pytest.raises(shmem.CorruptSegment):
        queue_ring.oob_loads(payload)  # ...which the record's size does not add up to
    short = payload[: len(payload) - 32]  # now it does
    with pytest.raises(ValueError, match="reshape|size"):
        queue_ring.oob_loads(short)
    q.close()


def test_a_damaged_out_of_band_record_is_corrupt_segment() -> None:
    np = pytest.importorskip("numpy")
    q = shmem.Queue(capacity=1 << 16)
    q.put(np.arange(100.0))
    other = shmem.SharedMemory(q.name)
    assert other.buf is not None
    # The record's payload starts at RING + 8: its head is (count, 0, pickle length).
    at = queue_layout.RING + queue_layout.REC
    other.buf[at : at + 4] = struct.pack("<I", 1 << 20)  # a buffer count far past the record
    with pytest.raises(shmem.CorruptSegment):
        q.get(timeout=10)
    q.put(np.arange(10.0))
    (head,) = struct.unpack_from("<Q", other.buf, queue_layout.OFF_HEAD)
    at = queue_layout.RING + head % q.capacity + queue_layout.REC  # the next record's payload
    other.buf[at + 16 : at + 24] = struct.pack("<Q", 1 << 40)  # a buffer length past the record
    with pytest.raises(shmem.CorruptSegment):
        q.get(timeout=10)
    q.put("still works")
    assert q.get(timeout=10) == "still works"
    other.close()
    q.close()
