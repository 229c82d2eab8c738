"""The reaper (issue 9): one per process tree, asleep while idle, hard to kill,
replaced when killed, never a reason for shmem to write into a descriptor it
no longer owns or for the program to die of SIGPIPE.

Every application here is a fresh interpreter started without SHMEM_REAPER
(``own_reaper.env``), so it starts a reaper of its own: the tests kill and
watch that one, never the reaper of the pytest process. Each application
reports the reaper it uses (``shmem._core.tracking.reaper_pid()``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from _core_workers import HOLDER, script
from conftest import PYTHON, REAPER_ENV, SHM_DIR, START_METHODS, OwnReaper, ProcessRef, wait_until


def _exists(name: str) -> bool:
    return os.path.exists(f"{SHM_DIR}/{name}")


class App:
    """An application in a fresh interpreter: runs ``code``, which reports one
    JSON line (``_core_workers.say``) and then usually waits on stdin."""

    def __init__(self, code: str, *args: str, env: Dict[str, str], new_session: bool = False) -> None:
        self.proc = subprocess.Popen(
            script(code) + list(args),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=new_session,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=60)
            raise AssertionError(f"the application died (returncode {self.proc.returncode}):\n{err.decode()}")
        self.report: Dict[str, Any] = json.loads(line)

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # the test failed half-way: do not leave it waiting
            self.kill()

    def exit(self) -> None:
        """Let it run to its end; require a clean exit."""
        _, err = self.proc.communicate(b"\n", timeout=60)
        assert self.proc.returncode == 0, (self.proc.returncode, err.decode())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=60)

    def killpg(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)
        self.proc.communicate(timeout=60)


def _reaper_of(app: App, own_reaper: OwnReaper, key: str = "reaper") -> ProcessRef:
    pid = app.report[key]
    assert pid is not None, "reaper_pid() is None after a tracked create"
    ref = own_reaper.add(pid)
    assert ref is not None and ref.is_reaper(), f"process {pid} is not a running shmem reaper"
    return ref


# Creates `count` tracked blocks; with "holder", starts a process (in its own
# process group, so a group kill reaches both) that attaches them; reports them and its reaper, waits on stdin.
_CREATOR = """
    import os, signal, subprocess, sys
    import shmem
    from _core_workers import reaper_pid, say
    count, with_holder = int(sys.argv[1]), sys.argv[2:] == ["holder"]
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C kills it outright, no exit handlers
    # And the others kill it too, whatever was inherited (under nohup, SIGHUP comes in ignored).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    blocks = [shmem.SharedMemory(create=True, size=4096) for _ in range(count)]
    holder = None
    if with_holder:
        holder = subprocess.Popen([sys.executable, "-c", sys.modules["_core_workers"].HOLDER]
                                  + [b.name for b in blocks], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert holder.stdout.readline() == b"held\\n"
    say(pid=os.getpid(), reaper=reaper_pid(), names=[b.name for b in blocks], holder=holder and holder.pid)
    sys.stdin.readline()
"""


def _hold(names: List[str], env: Dict[str, str]) -> subprocess.Popen[bytes]:
    """A process that attaches the blocks (tracked) and holds them until killed."""
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, *names], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    return holder


# ------------------------------------------------------------ one per process tree

_POOL_APP = """
    import multiprocessing, sys
    import shmem
    import _core_workers as workers
    method, prefix, main_first = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if __name__ == "__main__":
        ctx = multiprocessing.get_context(method)
        main_reaper, kept = None, None
        if main_first:
            kept = shmem.SharedMemory(prefix + "main", create=True, size=4096)
            main_reaper = workers.reaper_pid()
        barrier = ctx.Barrier(8)
        with ctx.Pool(8, initializer=workers.init_pool_worker, initargs=(barrier,)) as pool:
            results = pool.starmap(workers.create_tracked_and_report, [(prefix, i) for i in range(8)], chunksize=1)
            workers.say(results=results, main_reaper=main_reaper)
"""


@pytest.mark.parametrize("main_first", [False, True], ids=["workers-only", "main-first"])
@pytest.mark.parametrize("method", START_METHODS)
def test_a_pool_of_8_creators_shares_one_reaper(
    method: str, main_first: bool, own_reaper: OwnReaper, shm_prefix: str
) -> None:
    """8 workers that each create a tracked block add one reaper in total (with
    ``main-first``, the main process made a block first: the workers use its reaper).
    After everything exits, the blocks are removed and the reaper exits by itself."""
    proc = subprocess.run(
        script(_POOL_APP) + [method, shm_prefix, "1" if main_first else "0"],
        env=own_reaper.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    results = report["results"]
    reapers = {reaper for _, _, reaper in results}
    for pid in reapers | {report["main_reaper"]}:
        own_reaper.add(pid)
    assert len({worker for worker, _, _ in results}) == 8, "the 8 calls did not run in 8 workers"
    assert len(reapers) == 1 and None not in reapers, f"8 workers use reapers {sorted(map(str, reapers))}"
    if main_first:
        assert reapers == {report["main_reaper"]}
    (reaper,) = reapers
    names = [name for _, name, _ in results] + ([shm_prefix + "main"] if main_first else [])
    assert wait_until(lambda: not any(_exists(n) for n in names)), (
        f"left after the pool exited: {[n for n in names if _exists(n)]}"
    )
    assert ProcessRef(reaper).wait_gone(), "the reaper did not exit after its clients were gone"


_TREE_APP = """
    import os, subprocess, sys
    import shmem
    from _core_workers import reaper_pid, say
    prefix = sys.argv[1]
    own = shmem.SharedMemory(prefix + "parent", create=True, size=4096)
    child_code = (
        "import sys, shmem; from shmem._core.tracking import reaper_pid; "
        "s = shmem.SharedMemory(sys.argv[1], create=True, size=4096); print(reaper_pid()); s.close(); s.unlink()"
    )
    out = subprocess.run([sys.executable, "-c", child_code, prefix + "child"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        s = shmem.SharedMemory(prefix + "forked", create=True, size=4096)
        os.write(write, str(reaper_pid()).encode())
        s.close()
        s.unlink()
        os._exit(0)
    os.close(write)
    forked = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    say(parent=reaper_pid(), subprocess=int(out), forked=int(forked), env=os.environ.get(sys.argv[2]))
"""


def test_subprocesses_and_forks_use_the_reaper_of_their_tree(own_reaper: OwnReaper, shm_prefix: str) -> None:
    proc = subprocess.run(
        script(_TREE_APP) + [shm_prefix, REAPER_ENV], env=own_reaper.env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    own_reaper.add(report["parent"])
    assert report["env"], f"{REAPER_ENV} is not set in a process that tracks blocks"
    assert report["parent"] is not None
    assert report["subprocess"] == report["forked"] == report["parent"], report


_FORK_APP = """
import json, os, sys
import shmem
from shmem._core import tracking

prefix = sys.argv[1]
parent_block = shmem.SharedMemory(prefix + "parent", create=True, size=64)
def sockets():
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used
            continue
        if target.startswith("socket:"):
            found.append(target)
    return sorted(found)


inherited = sockets()
pid = os.fork()
if pid == 0:
    left = sockets()  # the parent's connection must not be kept, nor used
    child_block = shmem.SharedMemory(prefix + "child", create=True, size=64)
    mine = tracking.reaper_pid()
    print(json.dumps({"inherited": inherited, "left": left, "child_reaper": mine}), flush=True)
    os._exit(0)  # its block is left to the reaper
_, status = os.waitpid(pid, 0)
print(json.dumps({"parent_reaper": tracking.reaper_pid(), "status": status}), flush=True)
os._exit(0)
"""


def test_a_forked_child_drops_the_parents_connection_and_tracks_its_own(own_reaper: OwnReaper, shm_prefix: str) -> None:
    """fork while holding a tracked block: the child closes its copy of the parent's
    reaper socket (no descriptor leaked per fork), connects on its own first
    create, and the blocks of both are removed once both are gone."""
    proc = subprocess.run(
        script(_FORK_APP) + [shm_prefix], env=own_reaper.env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    child, parent = (json.loads(line) for line in proc.stdout.splitlines()[-2:])
    own_reaper.add(parent["parent_reaper"])
    assert parent["status"] == 0
    assert len(child["inherited"]) == 1 and child["left"] == [], child
    assert child["child_reaper"] == parent["parent_reaper"]
    assert wait_until(lambda: not _exists(shm_prefix + "parent") and not _exists(shm_prefix + "child"))


# ------------------------------------------------------------ hard to kill, replaced when killed


SIGNALS = [pytest.param(sig, id=sig.name) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)]


@pytest.mark.parametrize("when", ["at-once", "settled"])
@pytest.mark.parametrize("sig", SIGNALS)
def test_signals_to_the_reaper(sig: int, when: str, own_reaper: OwnReaper) -> None:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, a service stop, a closed terminal) do
    not stop the reaper while it has work - from the moment the create that
    started it has returned (``at-once``), or later (``settled``); after
    SIGKILL, the creator's blocks are still removed once it exits (a new
    reaper takes over)."""
    with App(_CREATOR, "2", env=own_reaper.env) as app:
        reaper = _reaper_of(app, own_reaper)
        names = app.report["names"]
        if when == "settled":
            time.sleep(0.5)
        os.kill(reaper.pid, sig)
        if sig == signal.SIGKILL:
            assert reaper.wait_gone()
        else:
            time.sleep(0.5)
            assert reaper.alive(), f"the reaper died of {signal.Signals(sig).name}"
        assert all(_exists(n) for n in names), "blocks were removed while their creator lives"
        app.exit()
    assert wait_until(lambda: not any(_exists(n) for n in names)), (
        f"left after the creator exited: {[n for n in names if _exists(n)]}"
    )


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_to_the_application_group_leaves_the_reaper_to_clean_up(sig: int, own_reaper: OwnReaper) -> None:
    """``kill -<sig> -<pgid>`` (or Ctrl-C at a terminal) kills the creator and a
    process that attached: the reaper, outside that group, removes the block."""
    with App(_CREATOR, "1", "holder", env=own_reaper.env, new_session=True) as app:
        reaper = _reaper_of(app, own_reaper)
        names = app.report["names"]
        holder = ProcessRef(app.report["holder"])
        try:
            assert os.getpgid(holder.pid) == app.proc.pid
            assert os.getpgid(reaper.pid) != app.proc.pid, "the reaper is in the application's process group"
            app.killpg(sig)
            assert app.proc.returncode == -sig
            assert holder.wait_gone(), f"the holder survived {signal.Signals(sig).name}"
        finally:
            try:  # whatever happened, nothing of the group may linger
                os.killpg(app.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert wait_until(lambda: not any(_exists(n) for n in names)), "the block outlived the killed group"


# ------------------------------------------------------------ asleep while idle

_IDLE_SECONDS = 3.0
_IDLE_WAKEUPS = 2


def _wakeups(reaper: ProcessRef) -> int:
    # All threads: a helper thread that polls counts as much as the main one.
    return reaper.status("voluntary_ctxt_switches") + reaper.status("nonvoluntary_ctxt_switches")


def _assert_sleeps(reaper: ProcessRef, what: str) -> None:
    time.sleep(0.5)  # let it settle after the last message
    before = _wakeups(reaper)
    time.sleep(_IDLE_SECONDS)
    woke = _wakeups(reaper) - before
    assert reaper.alive(), f"the reaper exited while {what}"
    assert woke <= _IDLE_WAKEUPS, f"the reaper woke {woke} times in {_IDLE_SECONDS} s while {what}"


def test_idle_reaper_sleeps_and_exits_after_its_clients(own_reaper: OwnReaper) -> None:
    """With blocks tracked and nothing happening, the reaper does not wake up;
    once its creator is gone and the blocks removed, it exits by itself."""
    with App(_CREATOR, "3", env=own_reaper.env) as app:
        reaper = _reaper_of(app, own_reaper)
        names = app.report["names"]
        _assert_sleeps(reaper, "its creator lives with 3 blocks")
        app.exit()
    assert wait_until(lambda: not any(_exists(n) for n in names))
    assert reaper.wait_gone(), "the reaper did not exit after its clients were gone"


def test_reaper_waiting_for_the_last_holder_sleeps_then_removes_within_seconds(own_reaper: OwnReaper) -> None:
    """The creator has exited but another process holds its block: the reaper
    waits without polling, and removes the block soon after the holder dies."""
    with App(_CREATOR, "1", env=own_reaper.env) as app:
        reaper = _reaper_of(app, own_reaper)
        names = app.report["names"]
        holder = _hold(names, own_reaper.env)
        try:
            app.exit()
            time.sleep(0.5)
            assert all(_exists(n) for n in names), "the block was removed while a process had it open"
            _assert_sleeps(reaper, "a process holds its creator's block")
            assert all(_exists(n) for n in names)
        finally:
            holder.kill()
            holder.communicate(timeout=60)
    assert wait_until(lambda: not any(_exists(n) for n in names), 3.0), "not removed after the holder died"


# ------------------------------------------------------------ descriptors it no longer owns (defect 3)

_CLOSERANGE_APP = """
    import os, sys
    import shmem
    from _core_workers import say
    log_path = sys.argv[1]
    before = shmem.SharedMemory(create=True, size=4096)  # connects to (or starts) the reaper
    had = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
    os.closerange(3, 65536)  # what daemonizing code does
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for fd in had:  # every descriptor number shmem used is now the application's log
        if fd != log:
            os.dup2(log, fd, inheritable=False)
    after = [shmem.SharedMemory(create=True, size=4096) for _ in range(3)]
    gone = shmem.SharedMemory(create=True, size=4096)
    gone.close()
    gone.unlink()
    say(names=[before.name] + [s.name for s in after], fds=had)
    sys.stdin.readline()
"""


def test_after_closerange_shmem_writes_nothing_into_reused_descriptors(own_reaper: OwnReaper, tmp_path: Path) -> None:
    """Daemonizing code closes every descriptor, then opens its log (which takes
    the reaper connection's old number): shmem must not write its protocol into
    that log, and the blocks made afterwards must be tracked again."""
    log = tmp_path / "application.log"
    with App(_CLOSERANGE_APP, str(log), env=own_reaper.env) as app:
        names = app.report["names"]
        assert app.report["fds"], "shmem held no descriptor to reuse: the test proves nothing"
        assert log.read_bytes() == b"", "shmem wrote into the application's log"
        time.sleep(1.5)  # the removal delay: nothing may go while the creator lives
        assert all(_exists(n) for n in names), "blocks were removed while their creator lives"
        app.kill()
    assert wait_until(lambda: not any(_exists(n) for n in names)), (
        f"not removed after the creator was killed: {[n for n in names if _exists(n)]}"
    )
    assert log.read_bytes() == b"", "shmem wrote into the application's log"


# ------------------------------------------------------------ SIGPIPE (defect 4)

_SIGPIPE_APP = """
    import os, signal, sys
    import shmem
    from _core_workers import reaper_pid, say, wait_gone
    op, end = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as CLI tools do, to behave under `| head`
    first = shmem.SharedMemory(create=True, size=4096)
    spare = shmem.SharedMemory(create=True, size=4096)
    old = reaper_pid()
    os.kill(old, signal.SIGKILL)
    wait_gone(old)
    names = [first.name, spare.name]
    if op == "create":
        names.append(shmem.SharedMemory(create=True, size=4096).name)
    else:
        spare.close()
        spare.unlink()
    say(old=old, new=reaper_pid(), names=names)
    if end == "kill":
        sys.stdin.readline()  # the test SIGKILLs us here
"""


@pytest.mark.parametrize("op,end", [("create", "exit"), ("create", "kill"), ("unlink", "exit")])
def test_a_killed_reaper_never_kills_the_program_with_sigpipe(op: str, end: str, own_reaper: OwnReaper) -> None:
    """With the default SIGPIPE action restored, the reaper is SIGKILLed, then the
    program creates (or unlinks) a block: it lives on (no exit 141 / -13), a new
    reaper takes over, and every block is removed once the program is gone -
    even when SIGKILLed, when no exit handler runs."""
    with App(_SIGPIPE_APP, op, end, env=own_reaper.env) as app:
        own_reaper.add(app.report["old"])
        new: Optional[ProcessRef] = own_reaper.add(app.report["new"])
        names: List[str] = app.report["names"]
        if end == "exit":
            app.exit()
        else:
            assert new is not None and new.pid != app.report["old"] and new.is_reaper(), (
                "no new reaper after the create that found the old one dead"
            )
            app.kill()
    assert wait_until(lambda: not any(_exists(n) for n in names)), (
        f"left after the program was gone: {[n for n in names if _exists(n)]}"
    )
