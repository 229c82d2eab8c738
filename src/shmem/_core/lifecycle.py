"""When a block is removed, and who removes it.

The contract (module docstring of ``shmem._memory`` states it for users):

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

* the **reaper**, a small process each creating process starts on its first
  tracked block (``_reaper.py``). It learns the blocks through a pipe, sees
  the creator die as end-of-file on that pipe - however it died - and then
  polls its blocks until each is removed. It prints nothing, runs in a
  process group of its own and ignores SIGINT, SIGTERM and SIGHUP (so Ctrl-C
  or a kill of the application's process group does not stop the cleanup),
  and exits when its list is empty. A creator whose reaper was killed starts
  a new one at exit.
* ``gc()``, for blocks nobody is left to remove: when the reaper was killed
  together with everything else (a container OOM-killed).
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import os
import sys
import threading
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

from .. import _platform
from .._errors import CorruptSegment, ShmemError
from .header import Header

# Far beyond any block's end: fcntl locks may cover bytes past EOF, and nobody
# locking the data itself can collide with it.
USERS_LOCK = 1 << 62

# How often the reaper reads its pipe (so how soon it notices the creator is gone).
READ_INTERVAL = 0.1
# How often the reaper looks again at blocks still in use after the creator died.
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
    except OSError:  # not a regular file, another user's, ...
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
            return Verdict.KEEP, header  # (one never finished was never given to anyone)
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


class RemovedBlock(NamedTuple):
    """A block ``gc()`` removed (or, in a dry run, would remove)."""

    name: str
    size: int
    creator_pid: int
    created: float  # seconds since the epoch


@dataclasses.dataclass(frozen=True)
class GcReport:
    """What ``gc()`` did. It iterates, counts and compares as its ``removed`` list."""

    removed: Tuple[RemovedBlock, ...]
    in_use: Tuple[str, ...] = ()  # blocks of dead creators that somebody still has open (left alone)
    dry_run: bool = False

    def __iter__(self) -> Iterator[RemovedBlock]:
        return iter(self.removed)

    def __len__(self) -> int:
        return len(self.removed)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GcReport):
            return (self.removed, self.in_use, self.dry_run) == (other.removed, other.in_use, other.dry_run)
        if isinstance(other, (list, tuple)):
            return list(self.removed) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def gc(*, dry_run: bool = False, prefix: str = "") -> GcReport:
    """Remove abandoned shmem blocks and report what was removed.

    Abandoned: created by shmem with ``track=True``, its creator is dead and no
    process has it open. That is what remains when every process involved was
    killed at once, the reaper included (a container OOM-killed), and nobody
    was left to clean up. Blocks made by other programs, blocks created with
    ``track=False`` and blocks still in use are never touched. Safe to run
    concurrently with itself and with running programs; idempotent.
    With ``dry_run``, reports what would be removed and removes nothing; with
    ``prefix``, looks only at blocks whose names start with it.
    """
    removed = []
    in_use = []
    for name in sorted(n for n in _platform.entries() if n.startswith(prefix)):
        verdict, header = remove_if_abandoned(name, dry_run=dry_run)
        if verdict is Verdict.REMOVED and header is not None:
            removed.append(RemovedBlock(name, header.size, header.creator.pid, header.created_ns / 1e9))
        elif verdict is Verdict.HELD_OPEN and header is not None and header.auto_remove:
            in_use.append(name)
    return GcReport(tuple(removed), tuple(in_use), dry_run)


# --------------------------------------------------------------- the reaper


def _encode(sign: str, name: str, block_id: int) -> bytes:
    # Hex keeps any name (spaces, newlines) on one line of the pipe protocol.
    return f"{sign} {block_id:016x} {name.encode('utf-8', 'surrogateescape').hex()}\n".encode()


def decode(line: bytes) -> Tuple[str, int, str]:
    sign, block_id, name = line.split()
    return sign.decode(), int(block_id, 16), bytes.fromhex(name.decode()).decode("utf-8", "surrogateescape")


class _ReaperClient:
    """This process's connection to its reaper, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0  # the process the connection belongs to (fork makes a new one)
        self._pipe: Optional[int] = None
        self._blocks: Dict[int, str] = {}

    def track(self, name: str, block_id: int) -> None:
        with self._lock:
            self._blocks[block_id] = name
            self._send(_encode("+", name, block_id))

    def untrack(self, name: str, block_id: int) -> None:
        with self._lock:
            if self._blocks.pop(block_id, None) is not None:
                self._send(_encode("-", name, block_id))

    def check_at_exit(self) -> None:
        """If our reaper was killed, start a new one now: it will see us exit and
        remove our blocks, where nobody would otherwise."""
        with self._lock:
            if self._blocks and self._pid == os.getpid():
                self._send(b".\n")  # a no-op line; writing it fails only if nobody reads

    def forget_after_fork(self) -> None:
        # The child did not create its parent's blocks, and must not keep the
        # parent's pipe open: the reaper would never see the parent die.
        if self._pipe is not None:
            try:
                os.close(self._pipe)
            except OSError:
                pass
        self.__init__()  # type: ignore[misc]

    def _send(self, message: bytes) -> None:
        if self._pipe is None or self._pid != os.getpid():
            self._start()
            return  # _start sent every tracked block, this one included
        try:
            os.write(self._pipe, message)  # < PIPE_BUF: atomic
        except OSError:  # the reaper died (someone killed it): start another
            self._start()

    def _start(self) -> None:
        if self._pipe is not None:
            try:
                os.close(self._pipe)
            except OSError:
                pass
            self._pipe = None
        read_end, write_end = os.pipe()  # both close-on-exec
        # Room for bursts of creates between two reads of the (polling) reaper.
        _platform.enlarge_pipe(write_end, 1 << 20)
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        argv = [
            sys.executable, "-I", "-S", "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from shmem._core.reaper import main; main()",
            package_parent,
        ]
        try:
            _platform.spawn_with_stdin(argv, read_end)
        except OSError as err:
            os.close(write_end)
            raise ShmemError(f"cannot start shmem's reaper process ({err}); use track=False") from err
        finally:
            os.close(read_end)
        self._pipe = write_end
        self._pid = os.getpid()
        for block_id, name in self._blocks.items():
            os.write(write_end, _encode("+", name, block_id))


_reaper = _ReaperClient()
atexit.register(_reaper.check_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reaper.forget_after_fork)

track_created = _reaper.track
untrack = _reaper.untrack
