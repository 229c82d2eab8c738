"""Broadcast workers run in child processes (importable under spawn and forkserver)."""

from __future__ import annotations

import os
import random
import time
from typing import Any, List

# The self-checking messages (pid, sequence number, filler, CRC32) are the queue tests' own.
from _queue_workers import check, message

__all__ = ["check", "message", "publish_forever", "read_forever", "receive", "subscribe_by_name_and_receive"]


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
