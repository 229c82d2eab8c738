"""Defects 3 and 4: attaching during creation, failed attaches (gh-153279) and
failed creations - each removes nothing it did not make, and leaves nothing."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import time
from typing import Any, List

import pytest
from conftest import PYTHON, PYTHON_PLATFORM_TWINS, SHM_DIR, implementations
from test_defects import (
    BOTH,
    STDLIB,
    is_stdlib,
    make_foreign_file,
    path_of,
    read_file,
    run_child,
    stdlib_xfail_if,
)

import shmem
import shmem._kinds.raw

# ================================================================ 3. attach during creation

STALLED_CREATOR = r"""
import importlib, json, os, sys
mod = importlib.import_module(sys.argv[1])
name, size, step = sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mod.__name__.startswith("shmem"):
    # shmem's C fast path never calls the os function stalled below: select its
    # pure-Python twins, as the python_platform fixture does (PYTHON_PLATFORM_TWINS).
    from shmem._platform import _linux
    for attribute, twin in json.loads(sys.argv[5]).items():
        setattr(_linux, attribute, getattr(_linux, twin))
real = getattr(os, step)

def stalled(*args):
    print("stalled", flush=True)
    sys.stdin.readline()  # until the test has tried to attach
    return real(*args)

setattr(os, step, stalled)
shm = mod.SharedMemory(name, create=True, size=size)
setattr(os, step, real)
print("created", flush=True)
sys.stdin.readline()
shm.close()
shm.unlink()
"""


@pytest.mark.parametrize("impl", implementations())
def test_attach_during_creation_sees_no_block_or_the_whole_block(impl: Any, shm_name: Any) -> None:
    """The creator is stopped between creating the file and sizing it (stdlib:
    ftruncate; shmem: posix_fallocate, before its ready mark). Attaching then
    must raise FileNotFoundError; once creation ends it gets the full block. The
    stdlib attacher sees a zero-size file (ValueError: cannot mmap an empty file)."""
    name, size = shm_name(), 65536
    step = "ftruncate" if is_stdlib(impl) else "posix_fallocate"

    def attach_once() -> str:
        try:
            shm = impl.SharedMemory(name)
        except FileNotFoundError:
            return "missing"
        except Exception as err:  # noqa: BLE001 - any other outcome is the defect
            return f"{type(err).__name__}: {err}"
        try:
            return "full" if shm.size == size else f"size {shm.size}"
        finally:
            shm.close()

    proc = subprocess.Popen(
        [PYTHON, "-c", STALLED_CREATOR, impl.__name__, name, str(size), step, json.dumps(PYTHON_PLATFORM_TWINS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        # The stall was honoured: the creator is inside the replaced os function.
        assert proc.stdout.readline() == "stalled\n"
        # The creation is under way: the stdlib's file exists under the name already;
        # shmem builds the block unnamed and links it only once it is complete.
        assert os.path.exists(path_of(name)) == is_stdlib(impl)
        during = [attach_once() for _ in range(20)]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        after: List[str] = []
        deadline = time.monotonic() + 60
        while not after or (after[-1] == "missing" and time.monotonic() < deadline):
            after.append(attach_once())
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert during == ["missing"] * 20
    assert set(after[:-1]) <= {"missing"} and after[-1] == "full", after
    assert proc.returncode == 0, stderr


# ================================================================ 4. failed attach / create


@pytest.mark.parametrize("impl", implementations())
def test_failed_mmap_on_attach_never_unlinks(impl: Any, shm_name: Any) -> None:
    """gh-153279: mmap failing (ENOMEM) during attach makes the stdlib unlink the block."""
    name = shm_name()
    creator = impl.SharedMemory(name, create=True, size=64)
    try:
        creator.buf[:4] = b"keep"
        mmap_module = STDLIB.mmap if is_stdlib(impl) else shmem._core.block.mmap

        def failing_mmap(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mmap_module, "mmap", failing_mmap)
            with pytest.raises(OSError) as info:
                impl.SharedMemory(name)
        assert info.value.errno == errno.ENOMEM
        assert os.path.exists(path_of(name)), "a failed attach removed the block"
        again = impl.SharedMemory(name)
        assert bytes(again.buf[:4]) == b"keep"
        again.close()
    finally:
        creator.close()
        with contextlib.suppress(FileNotFoundError):
            creator.unlink()


@pytest.mark.parametrize("impl", implementations())
def test_attaching_a_fifo_refuses_and_never_unlinks_it(impl: Any, shm_name: Any) -> None:
    """gh-153279: the stdlib fails to mmap a FIFO and then unlinks it."""
    name = shm_name()
    path = path_of(name)
    os.mkfifo(path)
    try:
        with pytest.raises(OSError) as info:
            impl.SharedMemory(name)
        assert os.path.lexists(path), "the failed attach removed the FIFO"
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
        if not is_stdlib(impl):
            assert isinstance(info.value, shmem.UnsafeSegment)
            assert isinstance(info.value, PermissionError)
    finally:
        if os.path.lexists(path):
            os.unlink(path)


def test_create_existing_name_keeps_the_block(shm_name: Any) -> None:
    name = shm_name()
    first = shmem.SharedMemory(name, create=True, size=64)
    try:
        first.buf[:5] = b"first"
        with pytest.raises(FileExistsError) as info:
            shmem.SharedMemory(name, create=True, size=128)
        assert isinstance(info.value, shmem.SegmentExists)
        other = shmem.SharedMemory(name)
        assert (other.size, bytes(other.buf[:5])) == (64, b"first")
        other.close()
    finally:
        first.close()
        first.unlink()


@pytest.mark.parametrize("impl", BOTH)
def test_create_existing_name_raises_file_exists_even_when_size_does_not_fit(impl: Any, shm_name: Any) -> None:
    """The usual ``try: create / except FileExistsError: attach`` must still
    work when the block's size does not fit in what is left of /dev/shm (the
    existing block may well be what fills it). Not a stdlib defect: parity."""
    name = shm_name()
    first = impl.SharedMemory(name, create=True, size=64)
    try:
        st = os.statvfs(SHM_DIR)
        too_big = 2 * st.f_blocks * st.f_frsize
        with pytest.raises(FileExistsError):
            impl.SharedMemory(name, create=True, size=too_big)
    finally:
        first.close()
        first.unlink()


FAILING_STEPS = [
    ("posix_fallocate", errno.ENOSPC),  # reserving memory
    ("link", errno.EIO),  # giving the finished block its name
    ("pwrite", errno.EIO),  # writing the header
    ("mmap", errno.ENOMEM),  # mapping, once complete
]


@pytest.mark.parametrize("step,err", FAILING_STEPS, ids=[s for s, _ in FAILING_STEPS])
@pytest.mark.usefixtures("python_platform")  # the os functions replaced are called, not bypassed in C
def test_failed_create_leaves_nothing(step: str, err: int, shm_name: Any) -> None:
    """shmem only: the stdlib also removes its file on these failures."""
    name = shm_name()
    calls: List[str] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(step)
        raise OSError(err, os.strerror(err))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shmem._core.block.mmap if step == "mmap" else os, step, failing)
        with pytest.raises(OSError) as info:
            shmem.SharedMemory(name, create=True, size=4096)
    assert calls == [step], "the injected failure was never reached"
    assert info.value.errno == err
    if err == errno.ENOSPC:
        assert isinstance(info.value, shmem.NoSpace)
    assert not os.path.lexists(path_of(name))


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.usefixtures("python_platform")  # shmem's posix_fallocate is called, not bypassed in C
def test_failed_create_never_removes_a_block_it_did_not_make(impl: Any, shm_name: Any) -> None:
    """While a creation is under way another process puts its own block under
    the name (stdlib: after unlinking the half-made one). The creation then
    fails; the stdlib unlinks *by name*, removing the other process's block."""
    name = shm_name()
    path = path_of(name)
    step = "ftruncate" if is_stdlib(impl) else "posix_fallocate"
    calls: List[str] = []

    def replaced_then_failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(step)
        if os.path.lexists(path):
            os.unlink(path)
        make_foreign_file(path, b"other")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, step, replaced_then_failing)
            with pytest.raises(OSError):
                impl.SharedMemory(name, create=True, size=4096)
        assert calls == [step], "the injected failure was never reached"
        assert os.path.lexists(path), "the failed create removed another process's block"
        assert read_file(path) == b"other"
    finally:
        if os.path.lexists(path):
            os.unlink(path)


def test_failed_create_after_sizing_never_removes_a_replacement(shm_name: Any) -> None:
    """shmem only, its last failure point: mapping fails once the block is
    complete, and meanwhile the name was given to another block."""
    name = shm_name()
    path = path_of(name)

    def replaced_then_failing(*args: Any, **kwargs: Any) -> Any:
        os.unlink(path)
        make_foreign_file(path, b"other")
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(shmem._core.block.mmap, "mmap", replaced_then_failing)
            with pytest.raises(OSError):
                shmem.SharedMemory(name, create=True, size=4096)
        assert read_file(path) == b"other"
    finally:
        if os.path.lexists(path):
            os.unlink(path)


OUT_OF_FDS_CHILD = r"""
import importlib, inspect, json, os, resource, sys
mod = importlib.import_module(sys.argv[1])
name = sys.argv[2]
kwargs = {"track": False} if "track" in inspect.signature(mod.SharedMemory).parameters else {}
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
fillers = []
try:
    while True:
        fillers.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
os.close(fillers.pop())  # exactly one descriptor left
error = None
try:
    shm = mod.SharedMemory(name, create=True, size=4096, **kwargs)
except OSError as err:
    error = err.errno
else:
    shm.close()
    shm.unlink()
for fd in fillers:
    os.close(fd)
left = os.path.lexists("/dev/shm/" + name)
if left:
    os.unlink("/dev/shm/" + name)  # (made by this child)
print(json.dumps({"error": error, "left": left}))
"""


@pytest.mark.parametrize(
    "impl",
    stdlib_xfail_if(sys.version_info < (3, 10), "stdlib 3.9 imports resource_tracker in unlink(): EMFILE again"),
)
def test_create_running_out_of_file_descriptors_leaves_nothing(impl: Any, shm_name: Any) -> None:
    """With one free descriptor, creation fails with EMFILE when mmap dups the
    fd (the stdlib; shmem on Python < 3.13) - and must remove the block it
    made. The stdlib >= 3.10 does. shmem on 3.13 needs one descriptor at a
    time (its mappings keep none): it succeeds, and leaves nothing either."""
    out = run_child(OUT_OF_FDS_CHILD, impl.__name__, shm_name())
    one_at_a_time = not is_stdlib(impl) and sys.version_info >= (3, 13)
    assert out == {"error": None if one_at_a_time else errno.EMFILE, "left": False}
