"""The reaper: the process that removes a creator's blocks after it is gone.

Started by ``_lifecycle._ReaperClient`` with the read end of a pipe as stdin.
Protocol, one line per message (names hex-encoded)::

    + <block_id:16 hex> <name hex>     the creator made this tracked block
    - <block_id:16 hex> <name hex>     the creator unlinked it

End-of-file means every process holding the write end is gone: the creator
exited or was killed, whatever the signal. From then on the reaper applies
``remove_if_abandoned`` to each block every POLL_SECONDS until none is left
(blocks still open in other processes wait for them), then exits.

It checks the creator's liveness itself rather than trusting end-of-file
alone: a daemonizing library that closes every descriptor would close the
pipe while the creator still lives.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict


def main() -> None:
    # Signals aimed at the application must not stop the cleanup that follows
    # them (our own process group already keeps terminal and group signals away).
    # SIGKILL still does: then gc() is the fallback.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    os.closerange(3, 1 << 16)  # inheritable fds of the creator are not ours to keep open

    from .lifecycle import POLL_SECONDS, READ_INTERVAL, Verdict, decode, remove_if_abandoned

    blocks: Dict[int, str] = {}
    pending = b""
    # Poll rather than block: a reader blocked on the pipe is woken by every message,
    # which costs each create and unlink in the creator a context switch (~20 us).
    os.set_blocking(0, False)
    while True:
        try:
            data = os.read(0, 1 << 16)
        except BlockingIOError:
            time.sleep(READ_INTERVAL)
            continue
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            try:
                sign, block_id, name = decode(line)
            except ValueError:
                continue
            if sign == "+":
                blocks[block_id] = name
            else:
                blocks.pop(block_id, None)

    while blocks:
        for block_id, name in list(blocks.items()):
            try:
                verdict, _ = remove_if_abandoned(name, block_id)
            except Exception:  # never loop forever on a block we cannot handle
                verdict = Verdict.FOREIGN
            if verdict not in (Verdict.IN_USE, Verdict.HELD_OPEN):
                del blocks[block_id]
        if blocks:
            time.sleep(POLL_SECONDS)
