"""SharedMemoryManager when processes die: real processes, real signals.

* The process that started the manager is SIGKILLed: the manager removes its
  blocks and exits within 2 seconds.
* The manager is SIGKILLed: clients get a clear error at once, never a hang;
  the blocks fall back to the core lifecycle (their process tree's reaper, or
  ``shmem.gc()`` when everything was killed at once) and the starter's
  shutdown removes the rest.
* Ctrl-C while inside ``with SharedMemoryManager()``: the with block cleans up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any, Dict

import _manager_workers as workers
import pytest
from _manager_workers import process_gone
from conftest import SHM_DIR, wait_until

import shmem
from shmem.managers import ManagerUnavailable, SharedMemoryManager

KEY = b"shmem manager signal tests"


def _exists(name: str) -> bool:
    return os.path.exists(f"{SHM_DIR}/{name}")


def _start(main: str, *args: str) -> tuple[subprocess.Popen[str], Dict[str, Any]]:
    proc = subprocess.Popen(
        workers.script(main) + list(args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"{main} failed: {err}")
    return proc, json.loads(line)


def test_parent_sigkilled_the_manager_removes_its_blocks_and_exits_within_2s(mp_context) -> None:
    with_array = "1" if _has_numpy() else "0"
    parent, info = _start("starter_main", mp_context.get_start_method(), with_array)
    names = info["names"]
    assert len(names) == 4 + int(with_array) and all(_exists(n) for n in names)
    # This process uses every block: only an unlink - the manager's - can remove them now,
    # not the creators' reapers (which wait for every user).
    held = [shmem.SharedMemory(n) for n in names]
    try:
        parent.kill()
        parent.communicate(timeout=30)
        gone = wait_until(lambda: not any(_exists(n) for n in names) and process_gone(info["manager"]), 2.0)
        assert gone, (
            f"after 2 s: blocks {[n for n in names if _exists(n)]}, "
            f"manager {'gone' if process_gone(info['manager']) else 'alive'}"
        )
    finally:
        for shm in held:
            shm.close()


def test_manager_sigkilled_clients_fail_at_once_and_blocks_are_removed() -> None:
    smm = SharedMemoryManager(authkey=KEY)
    smm.start()
    own = smm.SharedMemory(64)
    own.close()
    client, made = _start("client_main", repr(smm.address), KEY.hex())
    client_names = made["names"]

    manager = smm._process
    os.kill(manager.pid, signal.SIGKILL)
    manager.join(30)  # reaped: every thread is gone, and every descriptor closed
    assert not manager.is_alive()

    # A client that was connected: every call raises ManagerUnavailable, at once.
    out, err = client.communicate("go\n", timeout=60)
    assert client.returncode == 0, err
    outcomes = json.loads(out)["outcomes"]
    for call, outcome in outcomes.items():
        assert outcome["type"] == "ManagerUnavailable" and outcome["module"] == "shmem.managers", (call, outcome)
        assert outcome["connection_refused"], outcome
        assert str(smm.address) in outcome["message"], outcome
        assert outcome["seconds"] < 5, outcome
    # The process that started it too.
    started = time.monotonic()
    for call in (lambda: smm.SharedMemory(10), lambda: smm.ShareableList([1]), smm.blocks):
        with pytest.raises(ManagerUnavailable, match="gone"):
            call()
    assert time.monotonic() - started < 5

    # The client exited and the manager holds nothing any more: the client's reaper removes its blocks.
    assert wait_until(lambda: not any(_exists(n) for n in client_names)), "a dead client's blocks stayed"
    # Ours stays while we live (the core lifecycle), until the manager is shut down.
    assert _exists(own.name)
    smm.shutdown()
    assert not _exists(own.name)


def test_everything_sigkilled_at_once_gc_removes_the_manager_blocks(shm_prefix: str) -> None:
    """The starter, its manager and its reaper all SIGKILLed (a container OOM kill):
    nobody is left to remove the blocks; shmem.gc() does."""
    parent, info = _start("starter_main", "fork")
    names = info["names"]
    # One reaper serves the starter's whole tree, its worker included.
    assert len(info["reapers"]) == 1, info["reapers"]
    os.killpg(parent.pid, signal.SIGKILL)
    for reaper in info["reapers"]:
        os.kill(reaper, signal.SIGKILL)
    parent.communicate(timeout=30)
    assert wait_until(lambda: process_gone(info["manager"]))
    time.sleep(0.5)
    assert all(_exists(n) for n in names), "nobody was left to remove them, yet they are gone"
    removed = [r.name for r in shmem.gc(prefix=shm_prefix)]
    assert set(names) <= set(removed)
    assert not any(_exists(n) for n in names)


def test_ctrl_c_in_the_with_block_still_cleans_up(mp_context) -> None:
    """SIGINT reaches every process of the group; the manager ignores it, so the
    parent's with block can still shut it down - and nothing is left when it exits."""
    parent, info = _start("with_block_main", mp_context.get_start_method())
    names = info["names"]
    assert all(_exists(n) for n in names)
    os.killpg(parent.pid, signal.SIGINT)
    _, err = parent.communicate(timeout=60)
    assert "KeyboardInterrupt" in err
    # Right at exit, not later: the with block removed them (no reaper had to).
    assert not [n for n in names if _exists(n)], "the with block did not clean up"
    assert wait_until(lambda: process_gone(info["manager"]))


def test_sigterm_to_the_manager_removes_its_blocks() -> None:
    smm = SharedMemoryManager()
    smm.start()
    shm = smm.SharedMemory(64)
    manager = smm._process.pid
    os.kill(manager, signal.SIGTERM)
    assert wait_until(lambda: not _exists(shm.name) and process_gone(manager))
    with pytest.raises(ManagerUnavailable):
        smm.SharedMemory(64)
    smm.shutdown()
    shm.close()


def test_a_stopped_manager_never_hangs_its_clients() -> None:
    """Alive but not answering (SIGSTOP): calls give up after CALL_TIMEOUT with a clear error."""
    from shmem._kinds.manager import CALL_TIMEOUT

    smm = SharedMemoryManager()
    smm.start()
    manager = smm._process.pid
    os.kill(manager, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ManagerUnavailable, match="did not answer") as info:
            smm.blocks()
        assert CALL_TIMEOUT <= time.monotonic() - started < CALL_TIMEOUT + 10
        assert isinstance(info.value, ConnectionRefusedError)
    finally:
        os.kill(manager, signal.SIGCONT)
    shm = smm.SharedMemory(64)  # it answers again
    smm.shutdown()
    assert not _exists(shm.name)
    shm.close()


def _has_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True
