"""Mirror of ``multiprocessing.shared_memory``: change the import, keep the code.

Example::

    from shmem import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=10)
"""

from ._kinds.list import ShareableList
from ._kinds.raw import SharedMemory

__all__ = ["ShareableList", "SharedMemory"]
