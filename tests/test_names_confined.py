"""Defect 0 of issue 9: a block name never reaches outside /dev/shm.

Every entry point that takes a block name - the library, the ``shmem``
command, the manager's server - applies the one name rule (``InvalidName``, a
ValueError) before touching the file system. The names tried point at a file
outside /dev/shm (``../../tmp/.../precious.txt``), at a file in a
subdirectory of /dev/shm, at directories (``..``, ``.``, empty) or hold a NUL.
After each attempt the files they point at are still there, unchanged, and
nothing of their contents was printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from multiprocessing import managers
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple

import pytest
from conftest import SHM_DIR

import shmem

SCRIPT = str(Path(sys.executable).parent / "shmem")
CONTENT = b"PRECIOUS-" + bytes(range(256)) * 4  # text and every byte value: any dump of it is recognizable


class Targets(NamedTuple):
    outside: Path  # a file outside /dev/shm
    nested: Path  # a file in a subdirectory of /dev/shm
    names: Dict[str, str]  # case -> a name that must be refused

    def check_untouched(self) -> None:
        for path in (self.outside, self.nested):
            assert path.exists(), f"{path} was removed through a block name"
            assert path.read_bytes() == CONTENT, f"{path} was changed through a block name"


@pytest.fixture
def targets(tmp_path: Path, shm_prefix: str) -> Iterator[Targets]:
    outside = tmp_path / "precious.txt"
    outside.write_bytes(CONTENT)
    subdir = Path(SHM_DIR) / f"{shm_prefix}sub"
    subdir.mkdir()
    nested = subdir / "x"
    nested.write_bytes(CONTENT)
    names = {
        "outside": os.path.relpath(outside, SHM_DIR),  # ../../tmp/pytest-.../precious.txt
        "absolute": str(outside),
        "nested": f"{shm_prefix}sub/x",
        "parent": "..",
        "dot": ".",
        "empty": "",
        "nul": f"{shm_prefix}sub\0x",
    }
    assert (Path(SHM_DIR) / names["outside"]).resolve() == outside.resolve()
    try:
        yield Targets(outside, nested, names)
    finally:
        shutil.rmtree(subdir)  # ours: made above, before the leak guard looks


CASES = ["outside", "absolute", "nested", "parent", "dot", "empty", "nul"]
CLI_CASES = [c for c in CASES if c != "nul"]  # a command line cannot carry a NUL


def _refused(call: Callable[[], object]) -> None:
    with pytest.raises(shmem.InvalidName):
        call()


# ------------------------------------------------------------ the library

LIBRARY: Dict[str, Callable[[str], object]] = {
    "remove_segment": shmem.remove_segment,
    "remove_segment(force)": lambda name: shmem.remove_segment(name, force=True),
    "inspect_segment": shmem.inspect_segment,
    "SharedMemory": shmem.SharedMemory,
    "SharedMemory(track=False)": lambda name: shmem.SharedMemory(name, track=False),
    "ShareableList": lambda name: shmem.ShareableList(name=name),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("entry", list(LIBRARY))
def test_library_refuses_names_outside_the_directory(entry: str, case: str, targets: Targets) -> None:
    _refused(lambda: LIBRARY[entry](targets.names[case]))
    targets.check_untouched()


@pytest.mark.parametrize("case", CASES)
def test_array_functions_refuse_names_outside_the_directory(case: str, targets: Targets) -> None:
    pytest.importorskip("numpy")
    _refused(lambda: shmem.attach_array(targets.names[case]))
    _refused(lambda: shmem.zeros(4, name=targets.names[case]))
    targets.check_untouched()


# ------------------------------------------------------------ the command


def _dumps_of(data: bytes) -> List[str]:
    """How a piece of ``data`` would look in the command's output: as text, as a hexdump."""
    piece = data[:16]
    return [piece[:9].decode(), " ".join(f"{b:02x}" for b in piece), piece.hex()]


@pytest.mark.parametrize("case", CLI_CASES)
@pytest.mark.parametrize(
    "command", [["rm"], ["rm", "--force"], ["info"], ["info", "--json"]], ids=["rm", "rm-force", "info", "info-json"]
)
@pytest.mark.parametrize("via", ["script", "module"])
def test_command_refuses_names_outside_the_directory(via: str, command: List[str], case: str, targets: Targets) -> None:
    argv = [SCRIPT] if via == "script" else [sys.executable, "-m", "shmem"]
    done = subprocess.run(argv + command + [targets.names[case]], capture_output=True, text=True, timeout=60)
    targets.check_untouched()
    assert done.returncode > 0, f"exit {done.returncode}: {done.stdout!r} {done.stderr!r}"
    assert done.stderr.strip(), "no error message"
    assert "Traceback" not in done.stderr, done.stderr
    assert "removed" not in done.stdout
    for dump in _dumps_of(CONTENT):
        assert dump not in done.stdout + done.stderr, "the command printed the file's contents"


def test_command_goes_on_after_a_refused_name(targets: Targets, shm_name: Callable[[], str]) -> None:
    """``shmem rm GOOD BAD GOOD``: the bad name is refused (exit 1), the good ones removed."""
    good = [shm_name(), shm_name()]
    for name in good:
        shmem.SharedMemory(name, create=True, size=16, track=False).close()
    done = subprocess.run(
        [SCRIPT, "rm", good[0], targets.names["outside"], good[1]], capture_output=True, text=True, timeout=60
    )
    targets.check_untouched()
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stdout.split() == ["removed", good[0], "removed", good[1]]
    assert not any(os.path.exists(f"{SHM_DIR}/{n}") for n in good)


# ------------------------------------------------------------ the manager's server


def _server_call(smm: shmem.SharedMemoryManager, method: str, name: str) -> str:
    """Call ``method(name)`` on the manager's server as the standard library's client
    does; return the error it answered with ("" if it accepted)."""
    with smm._Client(smm._address, authkey=smm._authkey) as conn:  # type: ignore[attr-defined]
        try:
            managers.dispatch(conn, None, method, (name,))  # type: ignore[attr-defined]
        except Exception as err:  # the server's exception arrives as a RemoteError with its traceback
            return f"{type(err).__name__}: {err}"
    return ""


@pytest.mark.parametrize("case", CASES)
def test_manager_server_refuses_names_outside_the_directory(case: str, targets: Targets) -> None:
    """``track_segment`` would hold the file and remove it at shutdown;
    ``release_segment`` would remove it at once."""
    smm = shmem.SharedMemoryManager()
    smm.start()
    try:
        name = targets.names[case]
        answers = {method: _server_call(smm, method, name) for method in ("track_segment", "release_segment")}
        listed = smm.blocks()
    finally:
        smm.shutdown()
    targets.check_untouched()
    for method, error in answers.items():
        assert "InvalidName" in error, f"{method}({name!r}) answered {error or 'OK'!r}"
    assert [b.name for b in listed] == []
