"""Defects 5 and 6: names are checked before anything happens; blocks are
created 0600 whatever the umask; symlinks and directories are refused."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from conftest import blocks_with_prefix, implementations
from test_defects import NAME_MAX, is_stdlib, path_of, run_child, stdlib_xfail_if

import shmem

# ================================================================ 5. names


def invalid_name(kind: str, base: str) -> str:
    return {
        "empty": "",
        "slash": base + "/b",
        "absolute": "/" + base,
        "too_long": base + "x" * (NAME_MAX + 1 - len(base)),
        "nul": base + "\x00b",
    }[kind]


def check_invalid_name(impl: Any, kind: str, create: bool, shm_name: Any, shm_prefix: str) -> None:
    """Raises ValueError and creates nothing. When attaching, a block named
    ``base`` exists: a name silently reinterpreted as it (leading '/' stripped,
    truncated at NUL) must not attach to it."""
    base = shm_name()
    decoy = None if create else shmem.SharedMemory(base, create=True, size=16, track=False)
    try:
        before = blocks_with_prefix(shm_prefix)
        try:
            shm = impl.SharedMemory(invalid_name(kind, base), create=create, size=16)
        except ValueError as err:
            if not is_stdlib(impl):
                assert isinstance(err, shmem.InvalidName)
        else:
            shm.close()
            if create:
                shm.unlink()
            pytest.fail(f"invalid name accepted as {shm.name!r}")
        assert blocks_with_prefix(shm_prefix) == before
    finally:
        if decoy is not None:
            decoy.close()
            decoy.unlink()


@pytest.mark.parametrize("create", [True, False], ids=["create", "attach"])
@pytest.mark.parametrize("kind", ["empty", "slash", "absolute", "too_long"])
@pytest.mark.parametrize("impl", implementations())
def test_invalid_name_raises_value_error_before_anything(
    impl: Any, kind: str, create: bool, shm_name: Any, shm_prefix: str
) -> None:
    """stdlib: OSError(EINVAL / ENAMETOOLONG), or '/name' silently means 'name'."""
    check_invalid_name(impl, kind, create, shm_name, shm_prefix)


@pytest.mark.parametrize("create", [True, False], ids=["create", "attach"])
@pytest.mark.parametrize("impl", stdlib_xfail_if(sys.version_info < (3, 13), "stdlib < 3.13 truncates at NUL"))
def test_name_with_nul_raises_value_error(impl: Any, create: bool, shm_name: Any, shm_prefix: str) -> None:
    check_invalid_name(impl, "nul", create, shm_name, shm_prefix)


def test_attaching_a_missing_name_creates_nothing(shm_name: Any, shm_prefix: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        shmem.SharedMemory(shm_name())
    assert isinstance(info.value, shmem.SegmentNotFound)
    assert blocks_with_prefix(shm_prefix) == []


# ================================================================ 6. security

UMASK_CHILD = r"""
import importlib, json, os, sys
mod = importlib.import_module(sys.argv[1])
os.umask(0o277)
shm = mod.SharedMemory(sys.argv[2], create=True, size=64)
mode = os.stat("/dev/shm/" + sys.argv[2]).st_mode & 0o777
shm.close()
shm.unlink()
print(json.dumps({"mode": mode}))
"""


@pytest.mark.parametrize("impl", implementations())
def test_created_0600_whatever_the_umask(impl: Any, shm_name: Any) -> None:
    """stdlib: shm_open(0o600) & ~umask gives 0400 under umask 0277."""
    assert oct(run_child(UMASK_CHILD, impl.__name__, shm_name())["mode"]) == oct(0o600)


def test_symlink_is_refused_and_its_target_untouched(shm_name: Any, tmp_path: Any) -> None:
    """shmem only: glibc's shm_open uses O_NOFOLLOW, so the stdlib refuses too (ELOOP)."""
    target = tmp_path / "target"
    target.write_bytes(b"precious" * 512)
    before = os.stat(target)
    name = shm_name()
    path = path_of(name)
    os.symlink(target, path)
    try:
        with pytest.raises(shmem.UnsafeSegment) as info:
            shmem.SharedMemory(name)
        assert isinstance(info.value, PermissionError)
        with pytest.raises(FileExistsError):
            shmem.SharedMemory(name, create=True, size=16)
        assert os.path.islink(path) and os.readlink(path) == str(target)
    finally:
        os.unlink(path)
    after = os.stat(target)
    assert (after.st_size, after.st_mode, after.st_mtime_ns) == (before.st_size, before.st_mode, before.st_mtime_ns)
    assert target.read_bytes() == b"precious" * 512


def test_directory_is_refused_and_kept(shm_name: Any) -> None:
    """shmem only: the stdlib refuses too (EINVAL) and keeps it."""
    name = shm_name()
    path = path_of(name)
    os.mkdir(path)
    try:
        with pytest.raises(shmem.UnsafeSegment):
            shmem.SharedMemory(name)
        with pytest.raises(FileExistsError):
            shmem.SharedMemory(name, create=True, size=16)
        assert os.path.isdir(path)
    finally:
        os.rmdir(path)
