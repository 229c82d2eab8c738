"""``gc()``: remove the abandoned blocks nobody is left to remove."""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Tuple

from .. import _platform
from .lifecycle import Verdict, remove_if_abandoned


class RemovedBlock(NamedTuple):
    """A block ``gc()`` removed (or, in a dry run, would remove)."""

    name: str
    size: int
    creator_pid: int
    created: float  # seconds since the epoch


class GcReport:
    """What ``gc()`` did. It iterates, counts and compares as its ``removed`` list.
    Read-only. (A plain class, not a dataclass: importing dataclasses, and with it
    inspect, cost a fifth of ``import shmem``.)"""

    removed: Tuple[RemovedBlock, ...]
    in_use: Tuple[str, ...]  # blocks of dead creators that somebody still has open (left alone)
    dry_run: bool

    def __init__(self, removed: Tuple[RemovedBlock, ...], in_use: Tuple[str, ...] = (), dry_run: bool = False) -> None:
        object.__setattr__(self, "removed", removed)
        object.__setattr__(self, "in_use", in_use)
        object.__setattr__(self, "dry_run", dry_run)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a GcReport is read-only")

    def __repr__(self) -> str:
        return f"GcReport(removed={self.removed!r}, in_use={self.in_use!r}, dry_run={self.dry_run!r})"

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

    Args:
        dry_run: Report what would be removed, and remove nothing.
        prefix: Look only at blocks whose names start with it.

    Returns:
        A ``GcReport``: iterating it gives a ``RemovedBlock`` (name, size,
        creator pid, creation time) for each block removed; ``in_use`` names
        blocks of dead creators that a process still has open (left alone).

    It raises nothing because of what is in /dev/shm: a block that vanishes
    meanwhile, cannot be opened or does not validate is skipped.
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
