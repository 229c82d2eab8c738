"""Functions run in child processes (importable under spawn and forkserver)."""

from __future__ import annotations

from shmem import SharedMemory


def attach_write_close(name: str, index: int, value: int) -> None:
    shm = SharedMemory(name)
    shm.buf[index] = value
    shm.close()


def write_through_handle(shm: SharedMemory, index: int, value: int) -> None:
    """The handle arrives pickled (spawn, forkserver) or inherited (fork)."""
    shm.buf[index] = value
    shm.close()
