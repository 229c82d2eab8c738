"""shmem.Broadcast and shmem.Subscriber: one publisher, many subscribers, every message
to every subscriber from when it subscribed; a publisher that never waits, losses
declared with their count, processes killed anywhere, hostile blocks.

Real processes, real /dev/shm, real signals; timeouts are only safety nets.
"""

from __future__ import annotations

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
import time
from typing import Any, Callable, List, Tuple

import _broadcast_workers as workers
import pytest
from conftest import PYTHON, fork_child, kill_and_reap, run_pure_python, wait_until

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
        r, w = os.pipe()

        def hold() -> None:
            calls = sync_wait.calls(bc._block.mapping)  # type: ignore[union-attr]
            calls.lock(0)
            mapping = bc._block.mapping  # type: ignore[union-attr]
            start = broadcast_layout.RING + tail % 1024
            struct.pack_into("<IIQ", mapping, start, 3, broadcast_layout.TAG_BYTES, 2)
            mapping[start + 16 : start + 19] = b"new"
            struct.pack_into("<Q", mapping, broadcast_layout.OFF_TAIL, tail + 24)  # committed, not numbered
            struct.pack_into("<Q", mapping, broadcast_layout.OFF_OLDEST, 1)  # and a half-done drop
            os.write(w, b"1")
            time.sleep(60)

        pid = fork_child(hold)
        os.close(w)
        assert select.select([r], [], [], 10)[0] and os.read(r, 1) == b"1"
        os.close(r)
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


# ------------------------------------------------------------------ 5. the ctypes path


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
