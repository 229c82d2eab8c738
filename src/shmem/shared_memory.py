"""Mirror of ``multiprocessing.shared_memory``: change the import, keep the code.

Example::

    from shmem import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=10)
"""

from typing import TYPE_CHECKING

from ._kinds.raw import SharedMemory

if TYPE_CHECKING:
    from ._kinds.list import ShareableList


def __getattr__(name: str) -> object:
    """ShareableList, imported on first use: its codec and C module are a tenth of
    ``import shmem``, which every program pays, and most never make a list."""
    if name == "ShareableList":
        from ._kinds.list import ShareableList

        globals()["ShareableList"] = ShareableList
        return ShareableList
    raise AttributeError(f"module 'shmem.shared_memory' has no attribute {name!r}")


__all__ = ["ShareableList", "SharedMemory"]
