"""Broadcast workers run in child processes (importable under spawn and forkserver)."""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from typing import Any, List, Optional, Tuple

# A self-checking message: pid, sequence number, filler length, filler, then a CRC32 of all that.
_HEAD = struct.Struct("<IIH")
_CRC = struct.Struct("<I")


def message(pid: int, seq: int, rng: random.Random, max_filler: int = 200) -> bytes:
    filler = rng.getrandbits(8 * 256).to_bytes(256, "little")[: rng.randrange(max_filler + 1)]
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


def receive(sub: Any, n: int, ready: Any, out: Any) -> None:
    """Say ready, get ``n`` messages, report them (or the first error)."""
    ready.put(os.getpid())
    got: List[Any] = []
    try:
        for _ in range(n):
            got.append(sub.get(timeout=60))
    except Exception as err:  # reported, so the test shows it
        got.append(repr(err))
    out.put((os.getpid(), got))
    sub.close()


def subscribe_by_name_and_receive(name: str, n: int, ready: Any, out: Any) -> None:
    from shmem._kinds.broadcast import Subscriber

    receive(Subscriber(name), n, ready, out)


def publish_forever(bc: Any, seed: int) -> None:
    """A publisher to SIGKILL: self-checking messages, numbered from 0, as fast as it can."""
    rng = random.Random(seed)
    pid = os.getpid()
    seq = 0
    while True:
        bc.publish_bytes(message(pid, seq, rng))
        seq += 1


def read_forever(name: str) -> None:
    """A subscriber to SIGKILL: reads as fast as it can, losses and all."""
    from shmem._kinds.broadcast import MessagesLost, Subscriber

    sub = Subscriber(name)
    while True:
        try:
            sub.get_bytes(timeout=0.01)
        except MessagesLost:
            pass
        except Exception:
            time.sleep(0)
