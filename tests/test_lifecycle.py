"""The lifecycle contract, with real processes and real signals.

* track=True: a block stays while its creator or any process that has it open
  lives; it is removed, silently and within seconds, once all are gone.
* A process that only attached never removes a block (CPython gh-82300).
* track=False: never removed automatically.
* Blocks left when everything was SIGKILLed at once are removed by gc(),
  which never touches foreign blocks, untracked blocks or blocks in use.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import textwrap
import time
from typing import List, Optional

import pytest
from conftest import PYTHON, SHM_DIR, OwnReaper, ProcessRef, implementations, run_to_completion, wait_until

import shmem

# Creates or attaches a block, says "ready", holds it until a line arrives on stdin.
_HOLDER = textwrap.dedent(
    """
    import importlib, sys
    module = importlib.import_module(sys.argv[1])
    name, role, track = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    kwargs = {"track": track}
    if module.__name__.startswith("multiprocessing") and sys.version_info < (3, 13):
        kwargs = {}  # no track argument before 3.13
    shm = module.SharedMemory(name, create=role.startswith("create"), size=4096, **kwargs)
    child = None
    if role == "create+attacher":
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", sys.argv[5], sys.argv[1], name, "attach", "1"],
                                 stdout=subprocess.PIPE)
        assert child.stdout.readline().startswith(b"ready")
    reaper = ""
    if role.startswith("create") and track and module.__name__ == "shmem":
        from shmem._core.tracking import reaper_pid
        reaper = str(reaper_pid())
    shm.buf[0] = 1
    print("ready", reaper, flush=True)
    sys.stdin.readline()
    shm.close()
    """
)


def _exists(name: str) -> bool:
    return os.path.exists(f"{SHM_DIR}/{name}")


class Holder:
    """A separately started Python process holding a block.

    With ``own_reaper``, it starts a reaper of its own (one the test may kill)
    rather than sharing the pytest process's."""

    def __init__(
        self,
        module: str,
        name: str,
        role: str,
        track: bool = True,
        new_group: bool = False,
        own_reaper: Optional[OwnReaper] = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", _HOLDER, module, name, role, "1" if track else "0", _HOLDER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=new_group,
            env=own_reaper.env if own_reaper is not None else None,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        #: the reaper the creator uses (its own process group: a group kill misses it)
        self.reaper: Optional[ProcessRef] = None
        if len(line.split()) > 1 and line.split()[1] != b"None":
            self.reaper = ProcessRef(int(line.split()[1]))
            if own_reaper is not None:
                own_reaper.known.append(self.reaper)
        if not line.startswith(b"ready"):
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"holder failed: {err.decode()}")

    def exit(self) -> str:
        _, err = self.proc.communicate(b"\n", timeout=30)
        assert self.proc.returncode == 0, err
        return err.decode()

    def kill(self, group: bool = False) -> str:
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
            if self.reaper is not None:
                self.reaper.kill()
        else:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        return err.decode()


def _attach_close_exit(module: str, name: str) -> None:
    code = f"import {module} as m; s = m.SharedMemory({name!r}); s.buf[0]; s.close()"
    subprocess.run([PYTHON, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("impl", implementations("gh-82300: the attacher's resource tracker unlinks the block"))
def test_attacher_exit_never_removes_the_block(impl, shm_name) -> None:
    name = shm_name()
    creator = Holder(impl.__name__, name, "create")
    _attach_close_exit(impl.__name__, name)
    time.sleep(0.5)  # give any tracker or reaper time to (wrongly) act
    try:
        assert _exists(name), "the block vanished when a process that only attached exited"
    finally:
        creator.exit()


@pytest.mark.parametrize("impl", implementations("the resource tracker warns about 'leaked' blocks"))
def test_creator_exit_removes_the_block_silently(impl, shm_name) -> None:
    name = shm_name()
    creator = Holder(impl.__name__, name, "create")
    err = creator.exit()
    assert wait_until(lambda: not _exists(name))
    assert err == ""


@pytest.mark.parametrize("impl", implementations("the resource tracker warns about 'leaked' blocks"))
def test_sigkilled_creator_block_is_removed_silently(impl, shm_name) -> None:
    name = shm_name()
    creator = Holder(impl.__name__, name, "create")
    err = creator.kill()
    assert wait_until(lambda: not _exists(name)), "a SIGKILLed creator's block was not removed"
    assert err == ""


@pytest.mark.parametrize("how", ["exit", "kill"])
@pytest.mark.parametrize("impl", implementations("the creator's tracker removes a block still in use"))
def test_block_outlives_its_creator_while_in_use(impl, how: str, shm_name) -> None:
    name = shm_name()
    creator = Holder(impl.__name__, name, "create")
    user = Holder(impl.__name__, name, "attach")
    creator.exit() if how == "exit" else creator.kill()
    time.sleep(1.0)  # several reaper polls
    try:
        assert _exists(name), "the block was removed while another process had it open"
    finally:
        user.kill()  # the last user dies too: now nobody is left
    assert wait_until(lambda: not _exists(name)), "the block stayed after every process was gone"


def test_creator_that_closed_keeps_its_block_while_it_lives(shm_name) -> None:
    name = shm_name()
    shm = shmem.SharedMemory(name, create=True, size=10)
    shm.close()
    _attach_close_exit("shmem", name)
    time.sleep(0.5)
    assert _exists(name)
    shmem.SharedMemory(name).unlink()


def test_untracked_block_is_never_removed_automatically(shm_name) -> None:
    name = shm_name()
    creator = Holder("shmem", name, "create", track=False)
    creator.kill()
    time.sleep(1.0)
    assert _exists(name)
    assert name not in [r.name for r in shmem.gc(prefix=name)]
    shmem.SharedMemory(name, track=False).unlink()


def test_handles_passed_to_workers_never_remove_the_block(mp_context, shm_name) -> None:
    name = shm_name()
    shm = shmem.SharedMemory(name, create=True, size=16)
    from _workers import attach_write_close, write_through_handle

    workers = [
        mp_context.Process(target=write_through_handle, args=(shm, 0, 11)),
        mp_context.Process(target=attach_write_close, args=(name, 1, 22)),
    ]
    run_to_completion(workers)
    with mp_context.Pool(2) as pool:
        pool.starmap(write_through_handle, [(shm, 2, 33), (shm, 3, 44)])
    time.sleep(0.5)
    assert _exists(name)
    assert bytes(shm.buf[:4]) == bytes([11, 22, 33, 44])
    shm.close()
    shm.unlink()


def _abandon(name: str, own_reaper: OwnReaper) -> None:
    """A creator, an attacher and the creator's reaper, all SIGKILLed at once
    (as in a container OOM kill)."""
    group = Holder("shmem", name, "create+attacher", new_group=True, own_reaper=own_reaper)
    assert group.reaper is not None and group.reaper.is_reaper()
    group.kill(group=True)
    time.sleep(0.5)
    assert _exists(name), "nobody was left to remove the block, yet it is gone"


def _ours(removed: List[shmem.RemovedBlock], prefix: str) -> List[shmem.RemovedBlock]:
    return [r for r in removed if r.name.startswith(prefix)]


def test_a_process_group_killed_at_once_still_has_its_blocks_removed(shm_name, own_reaper: OwnReaper) -> None:
    """The reaper lives in a process group of its own: `kill -9 -<pgid>` on the
    application (creator and attacher) does not stop the cleanup."""
    name = shm_name()
    group = Holder("shmem", name, "create+attacher", new_group=True, own_reaper=own_reaper)
    group.reaper = None  # kill the group only
    group.kill(group=True)
    assert wait_until(lambda: not _exists(name)), "a group kill left the block behind"


def test_gc_removes_abandoned_blocks_and_nothing_else(shm_name, shm_prefix: str, own_reaper: OwnReaper) -> None:
    abandoned, foreign, untracked, in_use, in_use_by_orphan = (shm_name() for _ in range(5))
    _abandon(abandoned, own_reaper)
    with open(f"{SHM_DIR}/{foreign}", "wb") as f:  # another program's block
        f.write(os.urandom(3 * 4096))
    Holder("shmem", untracked, "create", track=False).kill()
    mine = shmem.SharedMemory(in_use, create=True, size=10)
    creator = Holder("shmem", in_use_by_orphan, "create")
    user = Holder("shmem", in_use_by_orphan, "attach")
    creator.kill()

    preview = shmem.gc(prefix=shm_prefix, dry_run=True)
    assert [r.name for r in preview] == [abandoned] and preview.dry_run and _exists(abandoned)
    assert preview.in_use == (in_use_by_orphan,)  # its creator is dead, but a process still uses it

    removed = _ours(shmem.gc(prefix=shm_prefix), shm_prefix)
    assert [(r.name, r.size) for r in removed] == [(abandoned, 4096)]
    assert removed[0].created <= time.time()
    assert not _exists(abandoned)
    for name in (foreign, untracked, in_use, in_use_by_orphan):
        assert _exists(name), name

    assert _ours(shmem.gc(prefix=shm_prefix), shm_prefix) == []  # idempotent
    with pytest.raises(AttributeError):
        preview.dry_run = False  # type: ignore[misc]  # a report is read-only
    assert repr(preview) == f"GcReport(removed={preview.removed!r}, in_use={preview.in_use!r}, dry_run=True)"
    assert pickle.loads(pickle.dumps(preview)) == preview
    user.kill()
    assert wait_until(lambda: not _exists(in_use_by_orphan))
    mine.close()
    mine.unlink()
    shmem.SharedMemory(untracked).unlink()
    os.unlink(f"{SHM_DIR}/{foreign}")


def test_concurrent_gc_runs_remove_each_block_once(shm_name, shm_prefix: str, own_reaper: OwnReaper) -> None:
    names = [shm_name() for _ in range(6)]
    for name in names:
        _abandon(name, own_reaper)
    code = f"import shmem, json; print(json.dumps([r.name for r in shmem.gc(prefix={shm_prefix!r})]))"
    runs = [subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    removed: List[str] = []
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0 and err == b"", err
        removed += [n for n in __import__("json").loads(out) if n in names]
    assert sorted(removed) == sorted(names)
    assert not any(_exists(n) for n in names)


def test_attach_during_removal_gets_not_found_or_a_live_block(shm_name) -> None:
    """An attacher racing the reaper either fails cleanly or holds the block,
    which then stays: removal happens under the exclusive lock."""
    for _ in range(5):
        name = shm_name()
        creator = Holder("shmem", name, "create")
        creator.kill()
        got: Optional[shmem.SharedMemory] = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                got = shmem.SharedMemory(name)
            except FileNotFoundError:
                break
            if not _exists(name):
                pytest.fail("attached a block whose name was already removed")
            got.close()
            got = None
        assert got is None
        assert wait_until(lambda: not _exists(name))


def test_a_killed_reaper_is_replaced_before_the_creator_exits(shm_name, own_reaper: OwnReaper) -> None:
    name = shm_name()
    code = textwrap.dedent(
        f"""
        import os, signal, time, shmem
        from shmem._core.tracking import reaper_pid
        shm = shmem.SharedMemory({name!r}, create=True, size=10)
        reaper = reaper_pid()
        print(reaper, flush=True)
        os.kill(reaper, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # gone (our child or not; a zombie counts)
            try:
                if os.waitpid(reaper, os.WNOHANG)[0] == reaper:
                    break
            except ChildProcessError:
                try:
                    with open(f"/proc/{{reaper}}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                            break
                except OSError:
                    break
            time.sleep(0.01)
        else:
            raise SystemExit("the reaper survived SIGKILL")
        """
    )
    done = subprocess.run([PYTHON, "-c", code], env=own_reaper.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: not _exists(name)), "nobody removed the block of a creator whose reaper was killed"


def test_ctrl_c_to_the_process_group_still_removes_the_block(shm_name, own_reaper: OwnReaper) -> None:
    """SIGINT reaches every process of the terminal's group. The reaper ignores
    it and removes the block of a creator that SIGINT killed outright (no
    KeyboardInterrupt, so no exit handlers that could start a new reaper)."""
    name = shm_name()
    code = textwrap.dedent(
        f"""
        import signal, sys, shmem
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        shm = shmem.SharedMemory({name!r}, create=True, size=10)
        print("ready", flush=True)
        sys.stdin.readline()
        """
    )
    creator = subprocess.Popen(
        [PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, env=own_reaper.env
    )
    assert creator.stdout is not None and creator.stdout.readline() == b"ready\n"
    os.killpg(creator.pid, signal.SIGINT)
    creator.communicate(timeout=30)
    assert creator.returncode == -signal.SIGINT
    assert wait_until(lambda: not _exists(name)), "Ctrl-C left the block behind"
