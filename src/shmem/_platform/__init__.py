"""Everything that differs between operating systems, behind one small interface.

The rest of shmem imports the names below from here and never looks at
``sys.platform``. Linux is the only backend so far; a macOS backend would
implement the same functions with ``shm_open`` (no /dev/shm and no O_TMPFILE
to build a block unnamed, so a ready flag instead of publish-by-link),
``flock``-based liveness, kqueue's EVFILT_PROC instead of pidfds, and a
socket file in a private directory instead of the abstract namespace.
"""

from __future__ import annotations

import sys

if sys.platform.startswith("linux"):
    from ._linux import (
        NAME_MAX,
        PURE_REQUESTED,
        SPEEDUPS_REQUIRED,
        Opened,
        ProcessIdentity,
        build_unnamed,
        close_if_open,
        connect,
        copy_into,
        current_process,
        entries,
        exists,
        file_identity,
        is_locked,
        listen,
        lock_exclusive,
        lock_shared,
        ofd_lock_holders,
        open_existing,
        open_locked,
        open_published,
        path_of,
        peer,
        process_alive,
        process_of_thread_mapping,
        processes_using,
        publish,
        reaper_address,
        reserve,
        send_message,
        spawn_with_stdin,
        still_open,
        still_published,
        thread_of_this_process,
        try_lock_exclusive,
        unlink,
        unlink_same,
        unlock_byte,
        watch_process,
    )
else:  # pragma: no cover
    raise ImportError(
        f"shmem does not support {sys.platform} yet (only Linux); use multiprocessing.shared_memory there"
    )

__all__ = [
    "NAME_MAX",
    "Opened",
    "PURE_REQUESTED",
    "SPEEDUPS_REQUIRED",
    "ProcessIdentity",
    "connect",
    "copy_into",
    "build_unnamed",
    "close_if_open",
    "current_process",
    "entries",
    "exists",
    "file_identity",
    "is_locked",
    "listen",
    "lock_exclusive",
    "lock_shared",
    "ofd_lock_holders",
    "open_existing",
    "open_locked",
    "open_published",
    "path_of",
    "peer",
    "process_alive",
    "process_of_thread_mapping",
    "processes_using",
    "publish",
    "reaper_address",
    "reserve",
    "send_message",
    "spawn_with_stdin",
    "still_open",
    "still_published",
    "thread_of_this_process",
    "try_lock_exclusive",
    "unlink",
    "unlink_same",
    "unlock_byte",
    "watch_process",
]
