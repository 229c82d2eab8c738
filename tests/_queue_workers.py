"""Queue workers run in child processes (importable under spawn and forkserver)."""

from __future__ import annotations

import os
import queue
import random
import struct
import zlib
from typing import Any, List, Optional, Tuple

# A self-checking message: pid, sequence number, filler length, filler, then a CRC32 of all that.
_HEAD = struct.Struct("<III")
_CRC = struct.Struct("<I")


def message(pid: int, seq: int, rng: random.Random, max_filler: int = 200, min_filler: int = 0) -> bytes:
    n = rng.randrange(min_filler, max_filler + 1)
    filler = rng.getrandbits(8 * n).to_bytes(n, "little")
    body = _HEAD.pack(pid, seq, len(filler)) + filler
    return body + _CRC.pack(zlib.crc32(body))


def check(data: bytes) -> Optional[Tuple[int, int]]:
    """(pid, seq) of an intact message; None for a torn or forged one."""
    if len(data) < _HEAD.size + _CRC.size:
        return None
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    pid, seq, n = _HEAD.unpack_from(body)
    if zlib.crc32(body) != crc or len(body) != _HEAD.size + n:
        return None
    return pid, seq


def sized_payloads(seed: int, n: int) -> Any:
    """The ``n`` payloads of the FIFO test: 0..200 bytes each, all derived from ``seed``."""
    rng = random.Random(seed)
    for i in range(n):
        size = rng.randrange(201)
        yield (i.to_bytes(4, "little") * 51)[:size] if size % 3 else rng.getrandbits(8 * size).to_bytes(size, "little")


def produce_sized(q: Any, seed: int, n: int) -> None:
    for payload in sized_payloads(seed, n):
        q.send_bytes(payload, timeout=60)
    q.close()


def echo(q_in: Any, q_out: Any, n: int) -> None:
    """Get ``n`` items from ``q_in``, put (pid, item * 2) into ``q_out``."""
    for _ in range(n):
        item = q_in.get(timeout=60)
        q_out.put((os.getpid(), item * 2))
    q_in.close()
    q_out.close()


def pool_put(q: Any, value: int) -> Tuple[int, str]:
    """A Pool task: put into the queue it was given (pickled by name)."""
    q.put(value * 10)
    return os.getpid(), q.name


def work_joinable(q: Any, n: int) -> None:
    for _ in range(n):
        q.get(timeout=60)
        q.task_done()
    q.close()


#: Filler of a large message: past the size the C ring copies without its mutex (BIG_COPY, 64 KiB).
LARGE = (70_000, 140_000)


def put_forever(q: Any, seed: int, large: bool = False) -> None:
    """A producer to SIGKILL: self-checking messages, numbered from 0, as fast as the ring takes them
    (``large``: every other one of LARGE's size)."""
    rng = random.Random(seed)
    pid = os.getpid()
    seq = 0
    while True:
        if seq % 4 == 3:
            q.put_many([message(pid, seq + i, rng, 60) for i in range(3)])
            seq += 3
        else:
            q.send_bytes(message(pid, seq, rng, *(LARGE[::-1] if large and seq % 2 else (200,))))
            seq += 1


def get_forever(q: Any, report_fd: int) -> None:
    """A consumer to SIGKILL: report each message got as its sequence number (0xFFFFFFFF: torn)."""
    while True:
        data = q.get()  # bytes either way: send_bytes gives them as they are, put_many pickled bytes
        got = check(data)
        os.write(report_fd, struct.pack("<I", 0xFFFFFFFF if got is None else got[1]))


def put_later(q: Any, item: Any, delay: float) -> None:
    """Put ``item`` after ``delay`` seconds (the asyncio test's producer)."""
    import time

    time.sleep(delay)
    q.put(item)
    q.close()


def take_counted(q: Any, results: Any, seed: int) -> None:
    """Take items with get and get_many, a few at a time, until none comes for a while; report them."""
    rng = random.Random(seed)
    taken: List[int] = []
    while True:
        try:
            if rng.random() < 0.5:
                taken.append(q.get(timeout=0.5))
            else:
                taken += q.get_many(rng.randrange(1, 9), timeout=0.5)
        except queue.Empty:
            break
    results.put(taken)
    q.close()


class Tracked:
    """A picklable object a weak reference can watch."""

    def __init__(self, n: int) -> None:
        self.n = n
