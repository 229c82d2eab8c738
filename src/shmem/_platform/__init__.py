"""Everything that differs between operating systems, behind one small interface.

The rest of shmem imports the names below from here and never looks at
``sys.platform``. Linux is the only backend so far; a macOS backend would
implement the same functions with ``shm_open`` (no /dev/shm to link in, so a
ready flag instead of publish-by-link) and ``flock``-based liveness.
"""

from __future__ import annotations

import sys

if sys.platform.startswith("linux"):
    from ._linux import (
        NAME_MAX,
        ProcessIdentity,
        create_exclusive,
        enlarge_pipe,
        current_process,
        entries,
        is_locked,
        lock_shared,
        open_existing,
        process_alive,
        processes_using,
        remove_own,
        reserve,
        spawn_with_stdin,
        still_published,
        try_lock_exclusive,
        unlink,
        write_at,
    )
else:  # pragma: no cover
    raise ImportError(
        f"shmem does not support {sys.platform} yet (only Linux); "
        "use multiprocessing.shared_memory there"
    )

__all__ = [
    "NAME_MAX",
    "ProcessIdentity",
    "create_exclusive",
    "enlarge_pipe",
    "current_process",
    "entries",
    "is_locked",
    "lock_shared",
    "open_existing",
    "process_alive",
    "processes_using",
    "remove_own",
    "reserve",
    "spawn_with_stdin",
    "still_published",
    "try_lock_exclusive",
    "unlink",
    "write_at",
]
