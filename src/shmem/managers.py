"""Mirror of ``multiprocessing.managers`` for shared memory: change the import, keep the code.

from shmem.managers import SharedMemoryManager

with SharedMemoryManager() as smm:
    sl = smm.ShareableList(range(2000))   # removed when the with block ends, whatever happens
"""

from ._kinds.manager import ManagerNotStarted, ManagerUnavailable, SharedMemoryManager
from ._kinds.manager_server import ManagedBlock, SharedMemoryServer

__all__ = ["ManagedBlock", "ManagerNotStarted", "ManagerUnavailable", "SharedMemoryManager", "SharedMemoryServer"]
