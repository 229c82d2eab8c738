"""When a block is removed, and who removes it.

The contract (the module docstring of ``shmem._kinds.raw`` states it for users):

* A block created with ``track=True`` is removed automatically once its creator
  *and* every process that had it open are gone - exited, crashed or
  SIGKILLed - and never before, unless someone calls ``unlink()``.
* A block created with ``track=False`` is never removed automatically.
* A process that only attached never removes anything (CPython gh-82300).

How it is kept - three facts, each checkable by any process at any time:

1. **Who made it**: the header records the creator's (pid, start time, pid
   namespace); a pid alone could be reused by an unrelated process.
2. **Who uses it**: every tracked handle holds a shared open-file-description
   lock on byte ``USERS_LOCK`` of the block's file. The kernel drops it when the
   last descriptor of that open goes - on ``close()``, on exit, on SIGKILL.
   Nobody uses the block iff an exclusive lock on that byte can be taken.
3. **It is still the same block**: the header's random ``block_id``, and the
   inode behind the name, so a name reused by a newer block is never mistaken
   for the old one.

``remove_if_abandoned`` applies the rule: auto-remove flag set, creator dead,
exclusive lock taken, name still ours -> unlink (while holding the lock, so an
attacher that arrives meanwhile waits for it, then finds the name gone and
gets FileNotFoundError). Two callers apply it:

* the **reaper** (``reaper.py``), one per process tree: the first process
  that creates a tracked block starts it, its descendants share it
  (``tracking.py``). It learns each creator's blocks over a socket, learns of
  the creator's death from the kernel (a pidfd), applies the rule at once,
  and looks again every ``POLL_SECONDS`` only at blocks still held open. It
  sleeps in the kernel while there is nothing to do, runs in a process group
  of its own, ignores SIGINT, SIGTERM and SIGHUP, and exits once no process is
  connected and no block is left to remove. A process whose reaper was killed
  starts another one at its next create, unlink or exit.
* ``gc()`` (``sweep.py``), for blocks nobody is left to remove: when the reaper
  was killed together with everything else (a container OOM-killed).
"""

from __future__ import annotations

import enum
import os
from typing import Optional, Tuple

from .. import _platform
from .._errors import CorruptSegment
from .header import Header

# Far beyond any block's end: fcntl locks may cover bytes past EOF, and nobody
# locking the data itself can collide with it.
USERS_LOCK = 1 << 62

# How often the reaper looks again at blocks still in use after their creator died.
POLL_SECONDS = 0.25


class Verdict(enum.Enum):
    REMOVED = "removed"
    IN_USE = "in use"  # its creator is alive (or cannot be judged)
    HELD_OPEN = "held open"  # its creator is gone, but a process has it open
    KEEP = "kept"  # created with track=False
    GONE = "gone"  # no such block, or the name now belongs to another block
    FOREIGN = "foreign"  # not made by shmem, or unreadable: never touched


def remove_if_abandoned(
    name: str, block_id: Optional[int] = None, *, dry_run: bool = False
) -> Tuple[Verdict, Optional[Header]]:
    """Unlink block ``name`` if the lifecycle rule says it is abandoned.

    With ``block_id``, only that block: a newer block under the same name is GONE.
    With ``dry_run``, everything is checked (the exclusive lock taken and
    dropped) but nothing is unlinked; REMOVED then means "would be removed".
    """
    try:
        opened = _platform.open_existing(name)
    except FileNotFoundError:
        return Verdict.GONE, None
    except (OSError, ValueError):  # not a regular file, another user's, not a block name...
        return Verdict.FOREIGN, None
    try:
        try:
            header = Header.read(opened.fd, opened.size, name)
        except (CorruptSegment, OSError):
            return Verdict.FOREIGN, None
        if header is None:
            return (Verdict.FOREIGN if block_id is None else Verdict.GONE), None
        if block_id is not None and header.block_id != block_id:
            return Verdict.GONE, header
        if not header.auto_remove and header.ready:
            return Verdict.KEEP, header  # (one never finished, by shmem 0.1, was never given to anyone)
        if _platform.process_alive(header.creator) is not False:
            return Verdict.IN_USE, header
        if not _platform.try_lock_exclusive(opened.fd, USERS_LOCK):
            return Verdict.HELD_OPEN, header
        if not _platform.still_published(name, opened.inode):
            return Verdict.GONE, header
        if dry_run:
            return Verdict.REMOVED, header
        try:
            _platform.unlink(name)
        except FileNotFoundError:
            return Verdict.GONE, header
        return Verdict.REMOVED, header
    finally:
        os.close(opened.fd)  # also drops the exclusive lock
