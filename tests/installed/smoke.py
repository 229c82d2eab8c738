"""Smoke test of an installed shmem (CI installs the built wheel into a clean
virtual environment and runs this from outside the source tree).

Proves that the wheel ships what a user and the tests rely on: the package
itself (not the checkout's files), its C extension, ``py.typed`` and the
stub of the C extension, the ``shmem`` command, and the version in one place.
Exits non-zero, saying what is missing, on the first failure.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import pathlib
import subprocess
import sys


def child(name: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import shmem

    shm = shmem.SharedMemory(name)
    queue.put(bytes(shm.buf[:5]))
    shm.close()


def main() -> None:
    import shmem
    import shmem._platform._fastpath  # noqa: F401 - the C fast paths were built into the wheel
    import shmem._queue  # noqa: F401
    import shmem._speedups  # noqa: F401
    import shmem._sync  # noqa: F401

    package = pathlib.Path(shmem.__file__).parent
    assert "site-packages" in package.parts, f"shmem imported from {package}, not from the installed wheel"
    for shipped in ("py.typed", "_speedups.pyi", "_sync.pyi", "_queue.pyi", "_platform/_fastpath.pyi"):
        assert (package / shipped).is_file(), f"the wheel lacks {shipped}"
    version = importlib.metadata.version("shmem")
    assert version == shmem.__version__, (version, shmem.__version__)

    # The environment's own bin directory, where pip put the entry point (PATH may not include it).
    command = str(pathlib.Path(sys.executable).parent / "shmem")
    assert os.access(command, os.X_OK), "the wheel installs no 'shmem' command"
    for argv in ([command, "--version"], [sys.executable, "-m", "shmem", "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
        assert version in out, (argv, out)
    subprocess.run([command, "ls"], capture_output=True, timeout=60, check=True)

    before = set(os.listdir("/dev/shm"))
    with shmem.SharedMemory(create=True, size=4096) as shm:
        shm.buf[:5] = b"hello"
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(shm.name, queue))
        proc.start()
        assert queue.get(timeout=60) == b"hello"
        proc.join(60)
        assert proc.exitcode == 0
        shm.unlink()
    sl = shmem.ShareableList(["héllo", 2**63 - 1, None])
    assert list(sl) == ["héllo", 2**63 - 1, None]
    sl.shm.close()
    sl.shm.unlink()
    lock = shmem.Lock()
    with lock:
        assert lock.locked() and not lock.owner_died
    lock.close()
    left = {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("shmem_")}
    assert not left, f"the smoke test left {left} in /dev/shm"
    print(f"smoke test of the installed shmem {version} from {package}: ok")


if __name__ == "__main__":
    main()
