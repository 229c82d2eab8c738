"""Defect 6 of issue 9: ``remove_segment()`` / ``shmem rm`` against a process that
attaches meanwhile.

They must follow the reaper's protocol: hold the block's users lock
exclusively from the in-use check to the unlink. Then a process that attaches
(tracked) in between either makes the removal refuse (the block stays, it is
in use) or finds the name gone (FileNotFoundError) - never ends up attached to
a block that was removed under it.

The race is made deterministic: the scan of /proc that is part of the in-use
check is wrapped so that, right after it, an attacher process attaches and we
wait until it has attached, failed, or is kept waiting.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from conftest import PYTHON, SHM_DIR

import shmem

# Waits for a line on stdin, attaches (tracked) and says what happened; then holds
# the block until stdin closes.
_ATTACHER = """
import sys
import shmem
print("waiting", flush=True)
sys.stdin.readline()
try:
    shm = shmem.SharedMemory(sys.argv[1])
except FileNotFoundError:
    print("not-found", flush=True)
else:
    print("attached", flush=True)
sys.stdin.readline()
"""

# How long the hook waits for the attacher: an attacher that is still waiting then
# is blocked on the lock the remover holds, which is what the protocol wants.
_ATTACH_WAIT = 2.0


def _exists(name: str) -> bool:
    return os.path.exists(f"{SHM_DIR}/{name}")


class Attacher:
    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [PYTHON, "-c", _ATTACHER, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"waiting\n"
        self.outcome: Optional[str] = None

    def attach_now(self, timeout: float) -> Optional[str]:
        """Tell it to attach; its answer, or None if it is still waiting after ``timeout``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        if select.select([self.proc.stdout], [], [], timeout)[0]:
            self.outcome = self.proc.stdout.readline().decode().strip()
        return self.outcome

    def finish(self) -> str:
        """Its final answer (waiting for it if it was blocked), then let it exit."""
        out, err = self.proc.communicate(b"\n", timeout=60)
        if self.outcome is None:
            self.outcome = out.decode().strip()
        assert self.proc.returncode == 0, err.decode()
        assert self.outcome in ("attached", "not-found"), (self.outcome, err.decode())
        return self.outcome

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=60)


def _scan_hook(monkeypatch: pytest.MonkeyPatch, after_scan: Callable[[], None]) -> List[int]:
    """Make the /proc scan of the in-use check call ``after_scan`` once, right after
    scanning; returns a list that records each call."""
    module = sys.modules[shmem.remove_segment.__module__]
    if hasattr(module, "users_of"):
        owner, attribute = module, "users_of"
    else:
        from shmem import _platform

        owner, attribute = _platform, "processes_using"
    scan = getattr(owner, attribute)
    calls: List[int] = []

    def hooked(*args: Any, **kwargs: Any) -> Any:
        result = scan(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            after_scan()
        return result

    monkeypatch.setattr(owner, attribute, hooked)
    return calls


def _remove_segment(name: str, capsys: pytest.CaptureFixture) -> bool:
    try:
        shmem.remove_segment(name)
    except shmem.SegmentInUse:
        return False
    return True


def _shmem_rm(name: str, capsys: pytest.CaptureFixture) -> bool:
    from shmem._cli import main

    code = main(["rm", name])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code in (0, 1), (code, out, err)
    return code == 0


REMOVERS: Dict[str, Callable[[str, pytest.CaptureFixture], bool]] = {
    "remove_segment": _remove_segment,
    "shmem-rm": _shmem_rm,
}


@pytest.fixture
def attacher(shm_name: Callable[[], str]) -> Iterator[Attacher]:
    name = shm_name()
    shm = shmem.SharedMemory(name, create=True, size=4096, track=False)
    shm.buf[:5] = b"alive"
    shm.close()  # nobody uses the block now: the removal may proceed
    proc = Attacher(name)
    try:
        yield proc
    finally:
        proc.kill()
        if _exists(name):
            shmem.SharedMemory(name, track=False).unlink()


@pytest.mark.parametrize("remover", list(REMOVERS))
def test_attach_between_check_and_unlink(
    remover: str, attacher: Attacher, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    name = attacher.name
    seen: List[Optional[str]] = []
    calls = _scan_hook(monkeypatch, lambda: seen.append(attacher.attach_now(_ATTACH_WAIT)))
    removed = REMOVERS[remover](name, capsys)
    assert calls, "the removal never scanned /proc: update this test's hook to the new in-use check"
    outcome = attacher.finish()
    if removed:
        assert not _exists(name)
        assert outcome == "not-found", (
            "the attacher attached while the removal was under way, and the block was removed under it"
        )
    else:
        assert _exists(name), "the removal refused, yet the block is gone"
        assert outcome == "attached"


def test_a_tracked_holder_blocks_removal_without_force(
    attacher: Attacher, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The exclusive-lock protocol alone refuses a block in use: the /proc scan is
    made blind (as for a process in another pid namespace, or another user's)."""
    name = attacher.name
    assert attacher.attach_now(30) == "attached"
    module = sys.modules[shmem.remove_segment.__module__]
    if hasattr(module, "users_of"):
        monkeypatch.setattr(module, "users_of", lambda names: {n: [] for n in names})
    from shmem import _platform

    monkeypatch.setattr(_platform, "processes_using", lambda names: {n: [] for n in names})
    with pytest.raises(shmem.SegmentInUse):
        shmem.remove_segment(name)
    assert _exists(name)
    assert not _shmem_rm(name, capsys)
    assert _exists(name)
    shmem.remove_segment(name, force=True)
    assert not _exists(name)
    assert attacher.finish() == "attached"
