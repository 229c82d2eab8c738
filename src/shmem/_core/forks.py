"""One place that resets per-process state in a child after ``fork()``.

A forked child inherits its parent's memory: connections, caches and locks
that belong to the parent (a lock another thread held at the fork stays held
forever in the child). Every module that keeps such state registers a reset
here instead of calling ``os.register_at_fork`` itself, so the resets run in
one known order: the order the modules registered them (lowest layer first,
as imports happen).
"""

from __future__ import annotations

import os
from typing import Callable, List

_resets: List[Callable[[], None]] = []


def reset_in_child(reset: Callable[[], None]) -> None:
    """Call ``reset()`` in every child process right after a fork."""
    _resets.append(reset)


def _after_fork_in_child() -> None:
    for reset in _resets:
        try:
            reset()
        except Exception:  # pragma: no cover - a reset must not break the child's fork()
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
