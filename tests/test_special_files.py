"""Something that is not a block, planted under a block's name: a Unix socket, a
FIFO or a directory in /dev/shm. Every way of opening a block refuses it with
``shmem.UnsafeSegment`` (a PermissionError), whatever the kind asked for, and
leaves it where it is; ``shmem info`` and ``shmem rm`` say what it is in one line
and leave it too.

A socket used to slip through as a plain ``OSError(ENXIO)``: open(2) fails on
it before shmem's file-type check can run (issue 10)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest
from conftest import SHM_DIR

import shmem

SCRIPT = str(Path(sys.executable).parent / "shmem")


def _plant_socket(path: str) -> Callable[[], None]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)  # a live one: somebody could be serving on it
    return sock.close


def _plant_fifo(path: str) -> Callable[[], None]:
    os.mkfifo(path, 0o600)
    return lambda: None


def _plant_directory(path: str) -> Callable[[], None]:
    os.mkdir(path, 0o700)
    return lambda: None


PLANTED: Dict[str, Tuple[Callable[[str], Callable[[], None]], Callable[[int], bool], str]] = {
    "socket": (_plant_socket, stat.S_ISSOCK, "socket"),
    "fifo": (_plant_fifo, stat.S_ISFIFO, "FIFO"),
    "directory": (_plant_directory, stat.S_ISDIR, "directory"),
}


@pytest.fixture(params=list(PLANTED))
def planted(request: pytest.FixtureRequest, shm_name: Any) -> Iterator[Tuple[str, str]]:
    """(name, what it is) of a special file this test made in /dev/shm; checks it is
    still there, untouched, afterwards, and removes it."""
    plant, is_kind, word = PLANTED[request.param]
    name = shm_name()
    path = f"{SHM_DIR}/{name}"
    close = plant(path)
    try:
        yield name, word
        assert is_kind(os.lstat(path).st_mode), f"the {word} was replaced or removed"
    finally:
        close()
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)


def _attach_array(name: str) -> object:
    pytest.importorskip("numpy")
    return shmem.attach_array(name)


OPENERS: Dict[str, Callable[[str], object]] = {
    "SharedMemory": lambda name: shmem.SharedMemory(name),
    "SharedMemory-untracked": lambda name: shmem.SharedMemory(name, track=False),
    "ShareableList": lambda name: shmem.ShareableList(name=name),
    "ShareableList-untracked": lambda name: shmem.ShareableList(name=name, track=False),
    "attach_array": _attach_array,
    "inspect_segment": shmem.inspect_segment,
    "remove_segment": shmem.remove_segment,
}


@pytest.mark.parametrize("opener", list(OPENERS))
def test_every_kind_refuses_it_as_unsafe(planted: Tuple[str, str], opener: str) -> None:
    name, word = planted
    with pytest.raises(shmem.UnsafeSegment) as info:
        OPENERS[opener](name)
    assert isinstance(info.value, PermissionError)
    assert info.value.filename == name and word in str(info.value)


def test_creating_under_its_name_is_refused(planted: Tuple[str, str]) -> None:
    name, _ = planted
    with pytest.raises(FileExistsError):
        shmem.SharedMemory(name, create=True, size=64)
    with pytest.raises(FileExistsError):
        shmem.ShareableList([1, 2], name=name)


def _shmem(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_the_command_says_what_it_is_and_leaves_it(planted: Tuple[str, str]) -> None:
    name, word = planted
    info = _shmem("info", name)
    assert info.returncode == 1 and info.stdout == ""
    assert info.stderr.count("\n") == 1 and name in info.stderr and word in info.stderr

    listing = _shmem("ls", "--all", "--json")
    assert listing.returncode == 0 and name not in listing.stdout  # not a block: not listed

    refused = _shmem("rm", name)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and word in refused.stderr
    assert os.path.lexists(f"{SHM_DIR}/{name}")
