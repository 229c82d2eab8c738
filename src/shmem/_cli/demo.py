"""``python -m shmem demo``: two processes share one block, and we say what happened.

The second process is started separately (a new interpreter, not a fork), as
two Python shells would be. It attaches by name, checks every byte the first
process wrote, writes an answer back and exits - and the block is still
there afterwards, which the standard library does not guarantee (gh-82300).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from typing import Callable, Iterator, Tuple

from .._kinds.raw import SharedMemory
from .._segments import inspect_segment

DATA_BYTES = 64 * 1024 * 1024
_ANSWER = struct.Struct("<QI")  # pid of the second process, crc32 it computed


def _timed(action: Callable[[], object]) -> Tuple[object, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def _human(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


def _pattern(n: int) -> Iterator[bytes]:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    for offset in range(0, n, len(chunk)):
        yield chunk[: n - offset]


def run(out=sys.stdout) -> int:  # type: ignore[no-untyped-def]
    def say(step: str, seconds: float) -> None:
        print(f"  {step:<58} {seconds * 1e3:8.1f} ms", file=out)

    print(f"shmem demo: two Python processes, one block of shared memory (pid {os.getpid()})", file=out)
    shm, took = _timed(lambda: SharedMemory(create=True, size=DATA_BYTES + _ANSWER.size))
    assert isinstance(shm, SharedMemory)
    try:
        say(f"process 1 created block {shm.name!r} ({_human(DATA_BYTES)}, reserved)", took)

        def fill() -> int:
            buf = shm.buf
            assert buf is not None
            offset = 0
            for piece in _pattern(DATA_BYTES):
                buf[offset : offset + len(piece)] = piece
                offset += len(piece)
            return zlib.crc32(buf[:DATA_BYTES])

        expected, took = _timed(fill)
        say(f"process 1 wrote {_human(DATA_BYTES)} into it", took)

        command = [sys.executable, "-m", "shmem._cli.demo", str(shm.name)]
        second, took = _timed(lambda: subprocess.run(command, capture_output=True, text=True, timeout=120))
        assert isinstance(second, subprocess.CompletedProcess)
        if second.returncode != 0:
            print(f"the second process failed:\n{second.stderr}", file=sys.stderr)
            return 1
        attach_s, check_s = (float(x) for x in second.stdout.split())
        say("process 2 started (a new interpreter, not a fork)", took - attach_s - check_s)
        say("process 2 attached by name", attach_s)
        say(f"process 2 read all {_human(DATA_BYTES)}, answered, closed and exited", check_s)

        assert shm.buf is not None
        pid, crc = _ANSWER.unpack(shm.buf[DATA_BYTES:])
        verdict = "matches" if crc == expected else "DIFFERS"
        print(f"  process 1 reads the answer of pid {pid}: checksum {crc:#010x} {verdict}", file=out)
        try:
            alive = inspect_segment(str(shm.name)).name == shm.name
        except FileNotFoundError:
            alive = False
        print(
            f"  block still there after process 2 exited: {'yes' if alive else 'NO'}"
            " (the standard library can lose it: gh-82300)",
            file=out,
        )
    finally:
        shm.close()
        _, took = _timed(shm.unlink)
    say("process 1 closed and unlinked the block", took)
    return 0 if crc == expected and alive else 1


def _second_process(name: str) -> None:
    shm, attach_s = _timed(lambda: SharedMemory(name))
    assert isinstance(shm, SharedMemory) and shm.buf is not None
    start = time.perf_counter()
    crc = zlib.crc32(shm.buf[:DATA_BYTES])
    shm.buf[DATA_BYTES:] = _ANSWER.pack(os.getpid(), crc)
    shm.close()
    print(attach_s, time.perf_counter() - start)


if __name__ == "__main__":
    _second_process(sys.argv[1])
