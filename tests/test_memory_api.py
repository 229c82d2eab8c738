"""SharedMemory keeps the standard library's API (Python 3.13 documentation)."""

from __future__ import annotations

import array
import multiprocessing.shared_memory as std_shared_memory
import pickle
import subprocess
import sys
import textwrap
import time
from multiprocessing import resource_tracker

import pytest
from conftest import implementations

import shmem
from shmem import SharedMemory, shared_memory


def test_public_names_are_sorted_and_exported_once() -> None:
    assert shmem.__all__ == sorted(set(shmem.__all__))
    for name in shmem.__all__:
        assert getattr(shmem, name) is not None
    assert shared_memory.SharedMemory is SharedMemory
    assert repr(SharedMemory).startswith("<class 'shmem.SharedMemory'")


def test_seed_example_1_runs_unchanged_but_for_the_import() -> None:
    # The first example of the seed document, verbatim after the import line.
    shm_a = shared_memory.SharedMemory(create=True, size=10)
    assert type(shm_a.buf) is memoryview
    buffer = shm_a.buf
    assert len(buffer) == 10
    buffer[:4] = bytearray([22, 33, 44, 55])
    buffer[4] = 100
    shm_b = shared_memory.SharedMemory(shm_a.name)
    assert array.array("b", shm_b.buf[:5]) == array.array("b", [22, 33, 44, 55, 100])
    shm_b.buf[:5] = b"howdy"
    assert bytes(shm_a.buf[:5]) == b"howdy"
    del buffer
    shm_b.close()
    shm_a.close()
    shm_a.unlink()


def test_generated_names_are_unique_and_slashless(shm_prefix: str) -> None:
    blocks = [SharedMemory(create=True, size=1) for _ in range(20)]
    try:
        names = {b.name for b in blocks}
        assert len(names) == 20
        for name in names:
            assert name.startswith(shm_prefix) and "/" not in name
    finally:
        for b in blocks:
            b.close()
            b.unlink()


def test_attributes_repr_and_close(shm_name) -> None:
    name = shm_name()
    shm = SharedMemory(name, create=True, size=100)
    assert (shm.name, shm.size, len(shm.buf)) == (name, 100, 100)
    assert repr(shm) == f"SharedMemory({name!r}, size=100)"
    other = SharedMemory(name, size=5)  # size is ignored when attaching
    assert other.size == 100
    other.close()
    other.close()  # idempotent
    assert other.buf is None
    shm.close()
    shm.unlink()


def test_context_manager_closes_but_never_unlinks(shm_name) -> None:
    name = shm_name()
    with SharedMemory(name, create=True, size=10) as shm:
        shm.buf[0] = 7
    assert shm.buf is None
    with SharedMemory(name) as again:
        assert again.buf[0] == 7
        again.unlink()


def test_pickle_attaches_by_name_and_keeps_track(shm_name) -> None:
    shm = SharedMemory(shm_name(), create=True, size=4096, track=False)
    data = pickle.dumps(shm)
    assert len(data) < 200  # a name, not the bytes
    copy = pickle.loads(data)
    assert (copy.name, copy.size, copy._track) == (shm.name, 4096, False)
    copy.buf[0] = 42
    assert shm.buf[0] == 42
    copy.close()
    shm.close()
    shm.unlink()


def test_unlink_removes_the_name_but_mappings_stay_valid(shm_name) -> None:
    name = shm_name()
    shm = SharedMemory(name, create=True, size=10)
    other = SharedMemory(name)
    shm.unlink()
    with pytest.raises(FileNotFoundError):
        SharedMemory(name)
    other.buf[1] = 9
    assert shm.buf[1] == 9
    with pytest.raises(FileNotFoundError):
        other.unlink()
    other.close()
    shm.close()


def test_errors_name_the_block_and_subclass_the_builtin(shm_name) -> None:
    name = shm_name()
    with pytest.raises(shmem.SegmentNotFound) as missing:
        SharedMemory(name)
    assert isinstance(missing.value, FileNotFoundError) and missing.value.filename == name
    assert name in str(missing.value)
    with pytest.raises(TypeError):
        SharedMemory(name, create=True, size="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SharedMemory(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("creator", ["shmem", "stdlib"])
def test_interoperates_with_the_standard_library(creator: str, shm_name) -> None:
    """Blocks made by either library are attached, read and written by the other."""
    name = shm_name()
    if creator == "shmem":
        made = SharedMemory(name, create=True, size=10)
        other = std_shared_memory.SharedMemory(name)
        # Keep the standard library's tracker from unlinking our block (gh-82300).
        resource_tracker.unregister(other._name, "shared_memory")  # type: ignore[attr-defined]
        assert other.size >= 10  # the standard library sees the whole file
    else:
        made = std_shared_memory.SharedMemory(name, create=True, size=10)
        other = SharedMemory(name)
        assert other.size == 10
    made.buf[:5] = b"hello"
    assert bytes(other.buf[:5]) == b"hello"
    other.buf[5:10] = b"world"
    assert bytes(made.buf[:10]) == b"helloworld"
    other.close()
    made.close()
    made.unlink()


@pytest.mark.parametrize("impl", implementations("gh-82300: the second shell's exit removes the block"))
def test_two_separately_started_pythons_share_a_block(impl, shm_name) -> None:
    """Seed example 2, the NumPy one, across two Python processes started
    separately (not forked); the second exits before the first is done."""
    pytest.importorskip("numpy")
    import numpy as np

    a = np.array([1, 1, 2, 3, 5, 8])
    # The standard library ignores SHMEM_NAME_PREFIX: name its block for the leak guard.
    shm = impl.SharedMemory(name=shm_name() if impl is std_shared_memory else None, create=True, size=a.nbytes)
    b = np.ndarray(a.shape, dtype=a.dtype, buffer=shm.buf)
    b[:] = a[:]
    second_shell = textwrap.dedent(
        f"""
        import numpy as np
        from {impl.__name__.rsplit(".", 1)[0]} import shared_memory
        existing_shm = shared_memory.SharedMemory(name={shm.name!r})
        c = np.ndarray((6,), dtype=np.int64, buffer=existing_shm.buf)
        assert list(c) == [1, 1, 2, 3, 5, 8], c
        c[-1] = 888
        del c
        existing_shm.close()
        """
    )
    subprocess.run([sys.executable, "-c", second_shell], check=True, timeout=60)
    time.sleep(0.5)  # the first shell carries on a while (and the stdlib's tracker acts meanwhile)
    assert list(b) == [1, 1, 2, 3, 5, 888]
    del b
    shm.close()
    shm.unlink()  # raises FileNotFoundError if the second process had removed it


@pytest.mark.parametrize("size", [2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100], ids=lambda n: f"{n:#x}")
def test_a_size_no_block_can_have_fails_at_once_and_makes_nothing(size: int, shm_name) -> None:
    """Issue 10: ``size=2**64`` raised struct.error. A size no file can have is a
    ValueError (``shmem.InvalidSize``), raised before anything touches /dev/shm."""
    name = shm_name()
    started = time.monotonic()
    with pytest.raises(ValueError) as info:
        SharedMemory(name, create=True, size=size)
    assert isinstance(info.value, shmem.InvalidSize) and str(size) in str(info.value)
    with pytest.raises(ValueError):
        SharedMemory(create=True, size=size)  # a generated name: the same
    assert time.monotonic() - started < 1.0
    with pytest.raises(FileNotFoundError):
        SharedMemory(name)


def test_a_size_that_does_not_fit_is_no_space_at_once(shm_name) -> None:
    """A representable size larger than /dev/shm: ENOSPC (``shmem.NoSpace``) before any allocation."""
    name = shm_name()
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        SharedMemory(name, create=True, size=2**62)
    assert isinstance(info.value, shmem.NoSpace) and time.monotonic() - started < 1.0
    with pytest.raises(FileNotFoundError):
        SharedMemory(name)


def test_attaching_ignores_the_size_as_the_standard_library_does(shm_name) -> None:
    """The standard library documents that ``size`` is ignored when attaching."""
    with shmem.SharedMemory(shm_name(), create=True, size=64) as made:
        for size in (0, 10, 2**64):
            with shmem.SharedMemory(made.name, size=size) as seen:
                assert seen.size == 64
        made.unlink()
