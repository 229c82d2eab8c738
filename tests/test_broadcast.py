"""shmem.Broadcast and shmem.Subscriber: one publisher, many subscribers, every message
to every subscriber from when it subscribed; a publisher that never waits, losses
declared with their count, processes killed anywhere, hostile blocks.

Real processes, real /dev/shm, real signals; timeouts are only safety nets.
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
from typing import Any, Callable, Dict, List, Tuple

import _broadcast_workers as workers
import pytest
from conftest import (
    PYTHON,
    close_under_waiters,
    fork_child,
    hold_in_child,
    in_child,
    kill_and_reap,
    run_pure_python,
    wait_until,
)
from test_defect_space import private_shm_available, run_in_private_shm  # noqa: F401 - a fixture

import shmem
from shmem._kinds import broadcast_layout, sync_wait
from shmem._kinds.broadcast import Broadcast, MessagesLost, Subscriber

SHM_DIR = "/dev/shm"
PURE = os.environ.get("SHMEM_PURE_PYTHON", "") not in ("", "0")


# ------------------------------------------------------------------ helpers


def mutex_word(handle: Any) -> int:
    """The glibc mutex's lock word (0: free)."""
    return int(struct.unpack_from("<i", handle._block.mapping, 0)[0])


def words(handle: Any) -> Tuple[int, int, int, int, int, int]:
    return broadcast_layout.CONTROL.unpack_from(handle._block.mapping, broadcast_layout.OFF_NEXT)  # type: ignore[no-any-return]


def drain(sub: Subscriber) -> List[Any]:
    """Everything there is to get now; a loss shows as ("lost", count)."""
    out: List[Any] = []
    while True:
        try:
            out.append(sub.get_bytes(False))
        except MessagesLost as lost:
            out.append(("lost", lost.count))
        except queue.Empty:
            return out


# ------------------------------------------------------------------ 1. the API


def test_publish_get_bytes_timeouts_and_sizes() -> None:
    bc = Broadcast(capacity=256)
    assert bc.capacity == 256 and bc.name in os.listdir(SHM_DIR) and bc.published == 0
    sub = bc.subscribe()
    assert sub.position == 0 and sub.pending() == 0
    with pytest.raises(queue.Empty):
        sub.get(timeout=0.1)
    with pytest.raises(queue.Empty):
        sub.get_nowait()
    with pytest.raises(queue.Empty):
        sub.get(False, 10)
    with pytest.raises(ValueError, match="non-negative"):
        sub.get(timeout=-1)
    assert bc.publish({"a": 1}) == 0
    assert bc.publish_bytes(bytearray(b"raw")) == 1
    bc.publish_bytes(memoryview(b"xmvx")[1:3])
    bc.publish_bytes(b"")
    bc.publish(("pickled", 2))
    assert sub.pending() == 5 and bc.published == 5
    assert sub.get() == {"a": 1}
    assert sub.get(timeout=1) == b"raw"  # bytes come back as bytes
    assert sub.get_bytes() == b"mv" and sub.get_nowait() == b""
    assert pickle.loads(sub.get_bytes()) == ("pickled", 2)
    with pytest.raises(TypeError):
        bc.publish_bytes("text")
    # Larger than the ring: ValueError, nothing published, the broadcast still usable.
    with pytest.raises(ValueError, match="does not fit"):
        bc.publish_bytes(bytes(241))
    with pytest.raises(ValueError, match="does not fit"):
        bc.publish(b"x" * 300)
    assert bc.published == 5 and sub.pending() == 0
    bc.publish_bytes(bytes(240))  # exactly the ring less a record header
    assert sub.get_bytes(timeout=1) == bytes(240)
    assert "capacity=256" in repr(bc) and "at message 6" in repr(sub)
    sub.close()
    sub.close()
    assert sub.name is None and "closed" in repr(sub)
    with pytest.raises(ValueError, match="closed"):
        sub.get()
    bc.close()
    bc.close()
    assert bc.name is None and "closed" in repr(bc)
    for call in (lambda: bc.publish(1), lambda: bc.publish_bytes(b""), bc.subscribe, lambda: pickle.dumps(bc)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_bad_arguments_and_names(shm_name: Callable[[], str]) -> None:
    with pytest.raises(ValueError, match="capacity"):
        Broadcast(capacity=8)
    with pytest.raises(TypeError, match="capacity"):
        Broadcast(capacity="1")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        Subscriber(shm_name())
    with pytest.raises(TypeError):
        Subscriber(None)  # type: ignore[arg-type]
    q = shmem.Queue()
    lock = shmem.Lock()
    try:
        for name, what in ((q.name, "queue"), (lock.name, "lock")):
            with pytest.raises(shmem.CorruptSegment, match=f"{name}.*{what}"):
                Subscriber(name)
            with pytest.raises(shmem.CorruptSegment, match=f"{name}.*{what}"):
                Broadcast(name)
    finally:
        q.close()
        lock.close()


def test_everything_closed_leaves_no_block_and_pickling(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    bc = Broadcast(name, capacity=4096)
    again = Broadcast(name, capacity=64)  # opens the one that exists: its capacity wins
    assert again.capacity == 4096
    sub = Subscriber(name)
    copy = pickle.loads(pickle.dumps(bc))
    assert copy.name == name
    copy.publish("a")
    twin = pickle.loads(pickle.dumps(sub))  # a copy of the subscription, at the same place
    assert sub.get(timeout=1) == "a" and twin.get(timeout=1) == "a"
    lost = pickle.loads(pickle.dumps(MessagesLost(3, 7)))
    assert isinstance(lost, LookupError) and isinstance(lost, shmem.ShmemError)
    assert (lost.count, lost.continues_at) == (3, 7) and "3 messages lost" in str(lost)
    for handle in (bc, again, copy, sub):
        handle.close()
        assert name in os.listdir(SHM_DIR)  # twin still has it open
    with twin:
        pass
    assert name not in os.listdir(SHM_DIR)
    with Broadcast(name) as bc2:  # the name is free again: a new, empty broadcast
        assert bc2.published == 0
    assert name not in os.listdir(SHM_DIR)


def _payload(i: int) -> bytes:
    """Message ``i`` of the wrap test: its number, then 0..200 bytes derived from it."""
    rng = random.Random(i)
    return struct.pack("<I", i) + rng.getrandbits(8 * 200).to_bytes(200, "little")[: rng.randrange(201)]


def test_many_wraps_of_a_small_ring_keep_every_byte() -> None:
    """Random sizes over a 512-byte ring (wrap records, ends too short for one): a
    subscriber that keeps up gets every message intact; one that reads now and then
    gets intact messages, in order, and losses told exactly."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with Broadcast(capacity=512) as bc, bc.subscribe() as near, bc.subscribe() as far:
        expected, lost = 0, 0
        for i in range(4000):
            assert bc.publish_bytes(_payload(i)) == i
            assert near.get_bytes(False) == _payload(i)
            if rng.random() < 0.3:
                for got in drain(far):
                    if isinstance(got, tuple):
                        expected += got[1]
                        lost += got[1]
                        continue
                    assert got == _payload(expected), f"seed {seed}"
                    expected += 1
        assert lost > 0 and drain(near) == []


# ------------------------------------------------------------------ 2. processes


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_subscribers_in_other_processes_get_every_message_in_order(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    n = 3000
    with Broadcast(capacity=1 << 20) as bc, shmem.Queue() as ready, shmem.Queue() as out:
        procs = [
            ctx.Process(target=workers.subscribe_by_name_and_receive, args=(bc.name, n, ready, out)) for _ in range(2)
        ]
        for p in procs:
            p.start()
        pids = {ready.get(timeout=60), ready.get(timeout=60)}
        for i in range(n):
            bc.publish(("msg", i))
        results = dict(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert set(results) == pids
        for got in results.values():
            assert got == [("msg", i) for i in range(n)]


def test_a_late_subscriber_sees_only_later_messages() -> None:
    with Broadcast(capacity=4096) as bc:
        early = bc.subscribe()
        for i in range(10):
            bc.publish(i)
        late = bc.subscribe()
        assert late.position == 10 and late.pending() == 0
        for i in range(10, 20):
            bc.publish(i)
        assert [late.get(timeout=1) for _ in range(10)] == list(range(10, 20))
        assert [early.get(timeout=1) for _ in range(20)] == list(range(20))
        with pytest.raises(queue.Empty):
            late.get_nowait()
        early.close()
        late.close()


def test_a_slow_subscriber_is_told_exactly_how_many_it_lost_then_continues() -> None:
    with Broadcast(capacity=1024) as bc, bc.subscribe() as slow:
        for i in range(5):
            bc.publish_bytes(struct.pack("<Q", i))
        assert struct.unpack("<Q", slow.get_bytes())[0] == 0  # read one, then fall behind
        for i in range(5, 1000):
            bc.publish_bytes(struct.pack("<Q", i))
        _, oldest, *_ = words(bc)
        with pytest.raises(MessagesLost) as info:
            slow.get()
        assert info.value.count == oldest - 1 and info.value.continues_at == oldest
        assert slow.position == oldest
        rest = [struct.unpack("<Q", slow.get_bytes(False))[0] for _ in range(1000 - oldest)]
        assert rest == list(range(oldest, 1000))  # the oldest remaining, in order, none skipped
        assert 1 + info.value.count + len(rest) == 1000
        with pytest.raises(queue.Empty):
            slow.get_nowait()
        # A second fall behind is told again, with its own count.
        for i in range(1000, 1200):
            bc.publish_bytes(struct.pack("<Q", i))
        with pytest.raises(MessagesLost) as info:
            slow.get()
        assert struct.unpack("<Q", slow.get_bytes())[0] == 1000 + info.value.count


def test_the_publisher_never_waits_for_a_stopped_subscriber() -> None:
    """Publish 10x the ring while a subscriber in another process does not read (it is
    stopped, between two gets): the publisher never waits; the subscriber, resumed,
    hears of its loss. (A subscriber stopped *inside* a get, holding the mutex for its
    few loads and one copy, would hold the publisher up until it is resumed.)"""
    with Broadcast(capacity=4096) as bc, bc.subscribe() as idle:
        r, w = os.pipe()
        go_r, go_w = os.pipe()

        def child() -> None:
            os.close(r)
            os.close(go_w)
            sub = Subscriber(bc.name)  # type: ignore[arg-type]
            os.write(w, b"r")
            assert os.read(go_r, 1) == b"g"
            try:
                sub.get(timeout=60)
            except MessagesLost as lost:
                os.write(w, struct.pack("<Q", lost.count))
                got = sub.get_bytes(timeout=10)
                os.write(w, got)
            sub.close()

        pid = fork_child(child)
        os.close(w)
        os.close(go_r)
        assert select.select([r], [], [], 30)[0] and os.read(r, 1) == b"r"
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        for i in range(10 * 4096 // 32):  # 32-byte records: 10x the ring
            bc.publish_bytes(struct.pack("<QQ", i, i))
        elapsed = time.monotonic() - start
        assert elapsed < 10, f"publishing took {elapsed:.1f} s"
        assert bc.published == 1280
        os.kill(pid, signal.SIGCONT)
        os.write(go_w, b"g")
        os.close(go_w)
        assert select.select([r], [], [], 30)[0]
        count = struct.unpack("<Q", os.read(r, 8))[0]
        assert select.select([r], [], [], 30)[0]
        first = struct.unpack("<QQ", os.read(r, 16))[0]
        assert count >= 1 and first == count  # it subscribed at 0: the oldest remaining is number count
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.close(r)
        with pytest.raises(MessagesLost) as info:
            idle.get_nowait()
        assert info.value.count == 1280 - (4096 // 32)
        assert struct.unpack("<QQ", idle.get_bytes())[0] == info.value.count


def test_a_subscriber_by_name_from_an_unrelated_program(shm_name: Callable[[], str]) -> None:
    name = shm_name()
    code = (
        "import sys, json\n"
        "from shmem._kinds.broadcast import Subscriber\n"
        "sub = Subscriber(sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "got = [sub.get(timeout=30) for _ in range(3)]\n"
        "print(json.dumps([g if isinstance(g, str) else g.decode() for g in got]), flush=True)\n"
        "sub.close()\n"
    )
    with Broadcast(name, capacity=4096) as bc:
        bc.publish("before")  # not seen: published before it subscribed
        child = subprocess.Popen([PYTHON, "-c", code, name], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            bc.publish("one")
            bc.publish_bytes(b"two")
            bc.publish("three")
            assert json.loads(child.stdout.readline()) == ["one", "two", "three"]
            assert child.wait(30) == 0
        finally:
            if child.poll() is None:
                kill_and_reap(child.pid)
            if child.stdout is not None:
                child.stdout.close()
    assert wait_until(lambda: name not in os.listdir(SHM_DIR))


# ------------------------------------------------------------------ 3. crash safety


def test_publisher_sigkilled_at_random_instants() -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    bc = Broadcast(capacity=2048)
    sub = bc.subscribe()
    rounds, deadline = 0, time.monotonic() + 5
    while rounds < 150 or (rounds < 1000 and time.monotonic() < deadline):
        rounds += 1
        child_seed = rng.randrange(1 << 30)
        pid = fork_child(lambda: workers.publish_forever(bc, child_seed))
        time.sleep(rng.random() * 0.003)
        kill_and_reap(pid)
        expected = 0
        for got in drain(sub):
            if isinstance(got, tuple):
                expected += got[1]
                continue
            checked = workers.check(got)
            assert checked is not None, f"a torn message after a kill (seed {seed}, round {rounds})"
            assert checked == (pid, expected), f"lost silently or duplicated (seed {seed}): {checked}"
            expected += 1
        assert mutex_word(bc) == 0
    bc.publish("fresh")
    assert sub.get(timeout=10) == "fresh"
    late = bc.subscribe()
    bc.publish("again")
    assert sub.get(timeout=10) == "again" and late.get(timeout=10) == "again"
    late.close()
    sub.close()
    bc.close()


def test_subscriber_sigkilled_at_random_instants() -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with Broadcast(capacity=1024) as bc, bc.subscribe() as sub:
        name = bc.name
        assert name is not None
        for _ in range(30):
            pid = fork_child(lambda: workers.read_forever(name))
            for i in range(rng.randrange(200)):
                bc.publish_bytes(struct.pack("<Q", i))
            time.sleep(rng.random() * 0.003)
            kill_and_reap(pid)
            drain(sub)
        bc.publish("still")
        assert drain(sub) == [pickle.dumps("still", pickle.HIGHEST_PROTOCOL)]
        assert mutex_word(bc) == 0


def test_holder_of_the_mutex_killed_mid_publish_is_repaired() -> None:
    """A process dies holding the mutex after writing a record and moving the tail past it
    but before numbering it, and with the oldest number not yet moved: the next process
    to take the mutex makes the words agree with the records, and the record counts."""
    with Broadcast(capacity=1024) as bc, bc.subscribe() as sub:
        bc.publish("a")
        bc.publish("b")
        next_seq, oldest, head, tail, _, _ = words(bc)
        assert (next_seq, oldest) == (2, 0)

        def hold() -> None:
            calls = sync_wait.calls(bc._block.mapping)  # type: ignore[union-attr]
            calls.lock(0)
            mapping = bc._block.mapping  # type: ignore[union-attr]
            start = broadcast_layout.RING + tail % 1024
            struct.pack_into("<IIQ", mapping, start, 3, broadcast_layout.TAG_BYTES, 2)
            mapping[start + 16 : start + 19] = b"new"
            struct.pack_into("<Q", mapping, broadcast_layout.OFF_TAIL, tail + 24)  # committed, not numbered
            struct.pack_into("<Q", mapping, broadcast_layout.OFF_OLDEST, 1)  # and a half-done drop

        pid = hold_in_child(hold)
        assert mutex_word(bc) != 0
        kill_and_reap(pid)
        assert [sub.get(timeout=10) for _ in range(3)] == ["a", "b", b"new"]
        assert bc.publish("c") == 3 and sub.get(timeout=10) == "c"
        assert mutex_word(bc) == 0


# ------------------------------------------------------------------ 4. hostile blocks


@pytest.mark.parametrize(
    "damage",
    [
        (broadcast_layout.OFF_HEAD, struct.pack("<Q", 3)),  # misaligned
        (broadcast_layout.OFF_TAIL, struct.pack("<Q", 1 << 40)),  # tail far past head
        (broadcast_layout.OFF_HEAD, struct.pack("<QQ", 0xFFFFFFFFFFFFFFF8, 0x1000)),
        (broadcast_layout.OFF_NEXT, struct.pack("<QQ", 1, 5)),  # oldest past next
        (broadcast_layout.OFF_NEXT, struct.pack("<Q", 1 << 30)),  # more messages than records
        (broadcast_layout.RING, struct.pack("<IIQ", 0x7FFFFFF0, 1, 0)),  # a record longer than the ring
        (broadcast_layout.RING, struct.pack("<IIQ", 1, 1, 7)),  # a record with the wrong number
        (broadcast_layout.RING, struct.pack("<IIQ", 512, 0xFFFFFFFF, 0)),  # a wrap record mid-ring
    ],
    ids=["misaligned-head", "far-tail", "wrapped-ends", "oldest-past-next", "too-many", "long", "number", "wrap"],
)
def test_damaged_words_and_records_raise_corrupt_segment(damage: Tuple[int, bytes]) -> None:
    bc = Broadcast(capacity=1024)
    sub = bc.subscribe()
    bc.publish("a")
    bc.publish("b")
    other = shmem.SharedMemory(bc.name)
    assert other.buf is not None
    offset, data = damage
    other.buf[offset : offset + len(data)] = data
    with pytest.raises(shmem.CorruptSegment) as info:
        sub._hint = -1  # make it walk from the head, where the damage is
        sub.get_nowait()
    assert isinstance(info.value, ValueError) and "damaged" in str(info.value)
    if offset != broadcast_layout.RING:
        for call in (lambda: bc.publish("c"), lambda: bc.subscribe(), lambda: bc.published):
            with pytest.raises(shmem.CorruptSegment):
                call()
    else:  # fill the ring: the publisher meets the damaged record when it drops it
        with pytest.raises(shmem.CorruptSegment):
            for _ in range(100):
                bc.publish_bytes(bytes(100))
    assert mutex_word(bc) == 0
    other.close()
    sub.close()
    bc.close()


# ------------------------------------------------------------------ 5. signal handlers
#
# publish and get take the mutex with every signal blocked: a Python signal handler that
# used the broadcast while its own thread held the mutex would meet the error-checking
# mutex (EDEADLK) or deadlock. A real SIGALRM every 0.2 ms, 1000 handler calls, in a child
# with a deadline; every message must come through intact, in publish order, once.

SIGNAL_CALLS = 1000


def _no_signal_blocked() -> bool:
    return not signal.pthread_sigmask(signal.SIG_BLOCK, [])


def _publishing_handler_run() -> Dict[str, Any]:
    bc = Broadcast(capacity=1 << 20)
    sub = bc.subscribe()
    order: Dict[int, Any] = {}  # message number -> the message, as publish numbered it
    numbers = itertools.count(1)
    fired = [0]
    depth, not_published = [0], [0]

    def handler(signum: int, frame: Any) -> None:
        # CPython may run a handler inside another: next() gives each its own number. Nested
        # four deep, one publishes nothing (handlers slower than the timer would nest without end).
        n = next(numbers)
        fired[0] = max(fired[0], n)
        if depth[0] >= 4:
            not_published[0] += 1
            return
        depth[0] += 1
        try:
            msg = ("sig", n, b"s" * (n % 300))
            order[bc.publish(msg)] = msg
        finally:
            depth[0] -= 1

    got: List[Any] = []
    main_put = 0
    old = signal.signal(signal.SIGALRM, handler)
    deadline = time.monotonic() + 40
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        while fired[0] < SIGNAL_CALLS and time.monotonic() < deadline:
            msg = ("main", main_put, b"m" * (main_put % 500))
            order[bc.publish(msg)] = msg  # signals land inside publish ...
            main_put += 1
            got.append(sub.get(timeout=10))
            # ... and inside get: more gets than the main thread publishes, so this one
            # mostly sleeps until a handler's publish wakes it.
            if len(got) < main_put + fired[0] - not_published[0]:
                got.append(sub.get(timeout=10))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    got.extend(sub.get(False) for _ in range(bc.published - len(got)))
    with pytest.raises(queue.Empty):
        sub.get_nowait()
    result = {
        "fired": fired[0],
        "main_put": main_put,
        "in_order": got == [order[i] for i in range(len(order))],
        "all": len(got) == len(order) == main_put + fired[0] - not_published[0],
        "unblocked": _no_signal_blocked(),
        "mutex": mutex_word(bc),
        "sleepers": words(bc)[5],
    }
    sub.close()
    bc.close()
    return result


def test_a_signal_handler_publishes_while_the_main_thread_publishes_and_gets() -> None:
    out = in_child(_publishing_handler_run)
    assert out["fired"] >= SIGNAL_CALLS, out
    assert out["in_order"] and out["all"], out
    assert out["unblocked"] and out["mutex"] == 0 and out["sleepers"] == 0, out


def _getting_handler_run() -> Dict[str, Any]:
    bc = Broadcast(capacity=1 << 20)
    sub_main, sub_sig = bc.subscribe(), bc.subscribe()
    order: Dict[int, Any] = {}
    calls, empties, lost = [0], [0], [0]
    busy = [False]
    from_handler: List[Any] = []

    def handler(signum: int, frame: Any) -> None:
        # One handler at a time on sub_sig (a nested one would use the subscriber the outer
        # one is inside of, not "another subscriber"): the nested call just returns.
        if busy[0]:
            return
        busy[0] = True
        try:
            calls[0] += 1
            try:
                from_handler.append(sub_sig.get(False))
            except queue.Empty:
                empties[0] += 1
            except MessagesLost:
                lost[0] += 1
        finally:
            busy[0] = False

    got: List[Any] = []
    timed_out = 0
    i = 0
    old = signal.signal(signal.SIGALRM, handler)
    deadline = time.monotonic() + 40
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        while calls[0] < SIGNAL_CALLS and time.monotonic() < deadline:
            msg = ("main", i, b"m" * (i % 400))
            order[bc.publish(msg)] = msg
            i += 1
            got.append(sub_main.get(timeout=10))
            # Nothing more is published: this get sleeps, the signals land inside it.
            try:
                got.append(sub_main.get(timeout=0.0005))
            except queue.Empty:
                timed_out += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    rest = [sub_sig.get(False) for _ in range(bc.published - sub_sig.position)]
    expected = [order[n] for n in range(len(order))]
    result = {
        "calls": calls[0],
        "timed_out": timed_out,
        "lost": lost[0],
        "main_in_order": got == expected,
        "handler_in_order": from_handler + rest == expected,
        "handler_got": len(from_handler),
        "unblocked": _no_signal_blocked(),
        "mutex": mutex_word(bc),
        "sleepers": words(bc)[5],
    }
    sub_main.close()
    sub_sig.close()
    bc.close()
    return result


def test_a_signal_handler_gets_from_another_subscriber_while_the_main_thread_gets() -> None:
    out = in_child(_getting_handler_run)
    assert out["calls"] >= SIGNAL_CALLS and out["timed_out"] > 0 and out["handler_got"] > 0, out
    assert out["main_in_order"] and out["handler_in_order"] and out["lost"] == 0, out
    assert out["unblocked"] and out["mutex"] == 0 and out["sleepers"] == 0, out


def _same_subscriber_run() -> Dict[str, Any]:
    bc = Broadcast(capacity=1 << 20)
    sub = bc.subscribe()
    got: List[Any] = []
    calls = [0]

    depth = [0]

    def handler(signum: int, frame: Any) -> None:
        calls[0] += 1
        if depth[0] >= 4:  # handlers slower than the timer would nest without end
            return
        depth[0] += 1
        try:
            got.append(sub.get(False))
        except queue.Empty:
            pass
        finally:
            depth[0] -= 1

    n = 0
    old = signal.signal(signal.SIGALRM, handler)
    deadline = time.monotonic() + 40
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        while calls[0] < SIGNAL_CALLS and time.monotonic() < deadline:
            bc.publish(n)
            n += 1
            if n % 2:
                try:
                    got.append(sub.get(False))
                except queue.Empty:  # a handler got it first
                    pass
            else:
                try:
                    got.append(sub.get(timeout=0.0005))  # mostly sleeps: a handler may get it meanwhile
                except queue.Empty:
                    pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    while sub.pending():
        got.append(sub.get(False))
    result = {"calls": calls[0], "exactly_once_in_order": got == list(range(n)), "got": len(got), "n": n}
    sub.close()
    bc.close()
    return result


def test_a_signal_handler_gets_from_the_subscriber_the_main_thread_is_getting_from() -> None:
    """The handler and the main thread share one subscriber: between them they must get
    every message once, in order - a handler that ran between a get taking its message
    and moving the subscriber's position got that message a second time."""
    out = in_child(_same_subscriber_run)
    assert out["calls"] >= SIGNAL_CALLS and out["exactly_once_in_order"], out


# ------------------------------------------------------------------ 6. fork and closed descriptors


def test_fork_while_another_thread_is_blocked_in_get() -> None:
    """A thread sleeps in get (the mutex free, counted as a sleeper) when the process forks:
    the child publishes through its copy of the handle, reads with its copy of the
    subscription and with a new one, closes them and exits; the thread gets the child's
    message, the block stays (the parent still has it open) and works on."""
    bc = Broadcast(capacity=4096)
    sub = bc.subscribe()
    name = bc.name
    for i in range(5):
        got: List[Any] = []
        t = threading.Thread(target=lambda: got.append(sub.get(timeout=60)))
        t.start()
        assert wait_until(lambda: words(bc)[5] >= 1, 10), "the thread never slept in get()"

        def child(i: int = i) -> None:
            new = Subscriber(name)  # type: ignore[arg-type]
            seq = bc.publish(("for the thread", i))
            assert new.get(timeout=10) == ("for the thread", i)
            # The child's copy of the sleeping thread's subscription reads on from where it was.
            assert sub.position == seq and sub.get(timeout=10) == ("for the thread", i)
            bc.publish_bytes(b"from the child")
            assert new.get(timeout=10) == sub.get(timeout=10) == b"from the child"
            new.close()
            sub.close()
            bc.close()

        in_child(child, timeout=30)  # its failure shows with its traceback
        t.join(30)
        assert not t.is_alive() and got == [("for the thread", i)]
        assert sub.get(timeout=10) == b"from the child"
        assert name in os.listdir(SHM_DIR)
        assert mutex_word(bc) == 0
    bc.publish("after")
    assert sub.get(timeout=10) == "after" and sub.pending() == 0
    sub.close()
    bc.close()


def test_fork_while_another_thread_publishes() -> None:
    """A thread publishes all the time (it holds the mutex at many a fork): every child
    subscribes, publishes, finds its own message among the thread's, intact and in order."""
    with Broadcast(capacity=4 << 20) as bc, bc.subscribe() as sub:  # far more than 20 forks' worth
        name = bc.name
        stop = threading.Event()

        def publisher() -> None:
            k = 0
            while not stop.is_set():
                bc.publish(("t", k))
                k += 1
                time.sleep(0.0002)

        t = threading.Thread(target=publisher)
        t.start()
        try:
            for i in range(20):

                def child(i: int = i) -> None:
                    new = Subscriber(name)  # type: ignore[arg-type]
                    bc.publish(("child", i))
                    last = -1
                    while True:
                        msg = new.get(timeout=10)
                        if msg == ("child", i):
                            break
                        assert msg[0] == "t" and msg[1] > last, msg
                        last = msg[1]
                    new.close()
                    bc.close()

                in_child(child, timeout=30)
        finally:
            stop.set()
            t.join(30)
        children, last = [], -1
        for msg in drain(sub):
            assert not isinstance(msg, tuple) or msg[0] != "lost", "the subscriber lost messages"
            kind, value = pickle.loads(msg)
            if kind == "child":
                children.append(value)
            else:
                assert kind == "t" and value == last + 1
                last = value
        assert children == list(range(20)) and mutex_word(bc) == 0


CLOSERANGE_CHILD = r"""
import json, os, sys
from shmem._kinds.broadcast import Broadcast, MessagesLost, Subscriber
bc = Broadcast(capacity=4096)
sub = bc.subscribe()
bc.publish("before")
os.closerange(3, 1024)
# Fill the low descriptors with files of ours: a stale fd the broadcast kept would hit them.
paths = [os.path.join(sys.argv[1], f"f{i}") for i in range(16)]
fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
r, w = os.pipe()
out = {"first": sub.get(timeout=10)}
got = []
for i in range(300):  # wraps the 4 KiB ring many times
    bc.publish_bytes(i.to_bytes(4, "little") * (i % 20))
    got.append(sub.get_bytes(timeout=10))
out["wraps"] = got == [i.to_bytes(4, "little") * (i % 20) for i in range(300)]
try:
    sub.get(timeout=0.05)  # a wait on the futex needs no descriptor
except Exception as err:
    out["empty"] = type(err).__name__
late = Subscriber(bc.name)  # opened by name after the purge
bc2 = Broadcast(capacity=4096)  # and a new broadcast
with bc2.subscribe() as sub2:
    bc2.publish(2)
    out["bc2"] = sub2.get(timeout=10)
bc.publish("late")
out["late"] = late.get(timeout=10)
for handle in (late, sub, bc, bc2):
    handle.close()
os.close(w)
out["pipe"] = os.read(r, 100).decode()
out["sizes"] = [os.fstat(fd).st_size for fd in fds]  # open still, and nothing written
print(json.dumps(out))
"""


def test_the_broadcast_survives_closerange_and_writes_no_unrelated_fd(tmp_path: Any) -> None:
    run = subprocess.run([PYTHON, "-c", CLOSERANGE_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {
        "first": "before",
        "wraps": True,
        "empty": "Empty",
        "bc2": 2,
        "late": "late",
        "pipe": "",
        "sizes": [0] * 16,
    }


# ------------------------------------------------------------------ 7. full /dev/shm

FULL_CHILD = r"""
import json, os, sys, shmem
out = {"errors": []}
for name in (None, sys.argv[1]):  # a generated name and a given one
    try:
        shmem.Broadcast(name, capacity=4 << 20)
    except OSError as err:
        out["errors"].append([type(err).__name__, isinstance(err, shmem.NoSpace)])
out["left"] = sorted(os.listdir("/dev/shm"))  # hidden, half-made files included
st = os.statvfs("/dev/shm")
out["all_space_free"] = st.f_bfree == st.f_blocks
# Two 600 KiB rings in 1 MiB: the second is refused at creation; the first keeps all its
# memory - writing every byte of its ring (a sparse block would SIGBUS here) and reading back.
with shmem.Broadcast(capacity=600 << 10) as first, first.subscribe() as sub:
    try:
        shmem.Broadcast(capacity=600 << 10)
    except OSError as err:
        out["errors"].append([type(err).__name__, isinstance(err, shmem.NoSpace)])
    out["first"] = []
    for i in range(3):  # 900 KiB through the ring: every byte of it written
        first.publish_bytes(bytes([i]) * (300 << 10))
        out["first"].append(sub.get_bytes(timeout=10) == bytes([i]) * (300 << 10))
    out["first_left"] = len(os.listdir("/dev/shm"))
with shmem.Broadcast(sys.argv[1], capacity=64 << 10) as bc, bc.subscribe() as sub:  # one that fits works
    bc.publish_bytes(bytes(60 << 10))
    out["fits"] = len(sub.get_bytes(timeout=10))
out["left_at_end"] = sorted(os.listdir("/dev/shm"))
print(json.dumps(out))
"""


def test_a_full_dev_shm_raises_no_space(shm_name: Callable[[], str], private_shm_available: None) -> None:  # noqa: F811
    out = run_in_private_shm(FULL_CHILD, shm_name())
    assert out == {
        "errors": [["NoSpace", True], ["NoSpace", True], ["NoSpace", True]],
        "left": [],
        "all_space_free": True,
        "first": [True] * 3,
        "first_left": 1,
        "fits": 60 << 10,
        "left_at_end": [],
    }


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # the threads: on purpose
def test_close_while_other_threads_wait_in_get_through_the_same_subscriber() -> None:
    """close() while two threads sleep in get on that subscriber: each raises ValueError saying
    so (before: a TypeError about None, and in the pure-Python path a segfault when the ctypes
    mutex call touched the unmapped block), and the broadcast works on for the publisher and
    for another subscriber. In a forked child: a crash fails the test."""

    def body() -> List[str]:
        bc = Broadcast()
        closing, other = bc.subscribe(), bc.subscribe()
        results = close_under_waiters(lambda: closing.get(timeout=30), closing.close)
        bc.publish("after")
        assert other.get(timeout=5) == "after"
        other.close()
        bc.close()
        return results

    # One that a busy machine had not put to sleep yet at the close hears that it is closed.
    said = {
        "ValueError: the shmem.Subscriber was closed while this call waited",
        "ValueError: cannot get: the shmem.Subscriber is closed",
    }
    results = in_child(body, timeout=60)
    assert len(results) == 2 and set(results) <= said, results


# ------------------------------------------------------------------ 8. the ctypes path


@pytest.mark.skipif(PURE, reason="this is the pure-Python run already")
def test_pure_python_path_passes_the_core_tests() -> None:
    run = run_pure_python(__file__, "not pure_python and not spawn")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_shmem_ls_and_info_show_what_a_broadcast_holds() -> None:
    bc = Broadcast(capacity=4096)
    for _ in range(100):
        bc.publish_bytes(b"x" * 16)  # 32 bytes a record: 4096 holds 128
    listed = subprocess.run([PYTHON, "-m", "shmem", "ls", "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    (record,) = [r for r in json.loads(listed.stdout) if r["name"] == bc.name]
    assert record["kind"] == "broadcast" and record["type"] == "Broadcast"
    assert (record["capacity"], record["published"], record["held"], record["used_bytes"]) == (4096, 100, 100, 3200)
    text = subprocess.run([PYTHON, "-m", "shmem", "ls"], capture_output=True, text=True, timeout=60).stdout
    assert "broadcast ring 4096 B (100 published, 100 held)" in text, text
    bc.close()
