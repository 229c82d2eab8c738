"""Defect 2 of issue 9: shmem called from a signal handler that interrupts shmem.

A handler that creates, closes and unlinks tracked blocks (the "on SIGTERM,
clean up" pattern) fires while the main thread is inside the same calls -
``SharedMemory`` create/close/unlink, ``ShareableList`` creation,
``shmem.zeros`` - from an interval timer, 1,000 times and more; and, once per
process, inside the very first tracked create (the one that sets up the
process's reaper connection). It must never deadlock, and no block may lose
its tracking: after the process dies (``os._exit`` or SIGKILL: no exit handler
runs), its reaper removes every block it kept.

Each run is a fresh interpreter with a hard timeout; a hang dumps its stacks
(faulthandler) and fails the test instead of hanging pytest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from typing import Any, Dict, List

import pytest
from _core_workers import script
from conftest import SHM_DIR, wait_until

# A hang fails here (stacks on stderr) well before the hard timeout below.
_DUMP_AFTER = 40
_TIMEOUT = 60

_PRELUDE = f"""
    import faulthandler, os, random, signal, sys, time
    import shmem
    from _core_workers import say
    faulthandler.dump_traceback_later({_DUMP_AFTER}, exit=True)
    main_kind, keep_every = sys.argv[1], int(sys.argv[2])
    if main_kind == "array":
        import numpy
    kept, handled = [], 0

    def make(kind, keep):
        # Create a tracked block of `kind`, close it, and unlink it unless `keep`.
        if kind == "raw":
            block = shmem.SharedMemory(create=True, size=64)
            name, shm = block.name, block
        elif kind == "list":
            block = shmem.ShareableList([1, "two", 3.0, b"four", None])
            name, shm = block.shm.name, block.shm
        else:
            block = shmem.zeros(8)
            name, shm = block.name, None
        if shm is not None:
            shm.close()
        if keep:
            kept.append(name)
        else:
            block.unlink()

    def handler(signum, frame):
        global handled
        handled += 1
        make("raw" if handled % 2 else "list", keep_every and handled % keep_every == 0)

    signal.signal(signal.SIGALRM, handler)
"""

# The main thread creates, closes and unlinks 1,000 blocks (and goes on until the
# handler has run 1,000 times) while the timer fires every millisecond. A first
# create of each kind comes before: it may start the reaper, which takes longer
# than the timer's period (that case has its own test below).
_LOOP = """
    make("raw", False)
    make(main_kind, False)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    done = 0
    while done < 1000 or handled < 1000:
        make(main_kind, keep_every and done % keep_every == 0)
        done += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            script(textwrap.dedent(_PRELUDE) + textwrap.dedent(code)) + list(args),
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"hung for {_TIMEOUT} s (deadlock):\n{err.stderr}")


def _report(done: subprocess.CompletedProcess[str]) -> Dict[str, Any]:
    lines = done.stdout.splitlines()
    assert lines, f"returncode {done.returncode}, no report:\n{done.stderr[-4000:]}"
    return json.loads(lines[-1])


def _assert_all_removed(names: List[str]) -> None:
    assert wait_until(lambda: not any(os.path.exists(f"{SHM_DIR}/{n}") for n in names), 10), (
        f"{sum(os.path.exists(f'{SHM_DIR}/{n}') for n in names)} of {len(names)} blocks lost their tracking"
    )


@pytest.mark.parametrize("main_kind", ["raw", "list", "array"])
def test_handler_interrupting_shmem_never_deadlocks(main_kind: str) -> None:
    if main_kind == "array":
        pytest.importorskip("numpy")
    done = _run(textwrap.dedent(_LOOP) + "say(done=done, handled=handled)\n", main_kind, "0")
    assert done.returncode == 0, done.stderr[-4000:]
    report = _report(done)
    assert report["done"] >= 1000 and report["handled"] >= 1000, report


@pytest.mark.parametrize("end", ["_exit", "SIGKILL"])
@pytest.mark.parametrize("main_kind", ["raw", "list"])
def test_handler_interrupting_shmem_loses_no_tracking(main_kind: str, end: str) -> None:
    """Every 10th block, in the handler and in the main loop, is kept (closed, not
    unlinked): all of them must be removed once the process is gone."""
    ending = "os._exit(0)" if end == "_exit" else "os.kill(os.getpid(), signal.SIGKILL)"
    done = _run(textwrap.dedent(_LOOP) + f"say(done=done, handled=handled, kept=kept)\n{ending}\n", main_kind, "10")
    report = _report(done)
    assert done.returncode == (0 if end == "_exit" else -signal.SIGKILL), done.stderr[-4000:]
    kept = report["kept"]
    assert len(kept) >= 200, f"only {len(kept)} blocks kept: the test proves little"
    _assert_all_removed(kept)


# 40 forked children: in each, a one-shot timer fires at a random instant of its
# first tracked create (which sets up its connection to the reaper), and the
# handler creates and keeps a block. Each child reports both names and leaves
# with os._exit: only the reaper can remove them.
_FIRST_CREATE = """
    import json, select
    shmem.SharedMemory(create=True, size=64).unlink()  # the driver's reaper is up; children share it
    names, hung = [], []
    for i in range(40):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            kept.clear()
            signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-5, 2e-3))
            make(main_kind, True)
            deadline = time.monotonic() + 0.1
            while not handled and time.monotonic() < deadline:
                pass  # the timer fired after the create: let the handler run now
            os.write(write, json.dumps(kept).encode())
            os._exit(0)
        os.close(write)
        chunks = []
        while True:
            if not select.select([read], [], [], 10)[0]:
                hung.append(i)  # (it takes milliseconds)
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read)
        os.waitpid(pid, 0)
        names += json.loads(b"".join(chunks) or b"[]")
        if hung:
            break
    say(names=names, hung=hung)
"""


@pytest.mark.parametrize("main_kind", ["raw", "list"])
def test_handler_interrupting_the_first_tracked_create(main_kind: str) -> None:
    done = _run(_FIRST_CREATE, main_kind, "1")
    assert done.returncode == 0, done.stderr[-4000:]
    report = _report(done)
    assert report["hung"] == [], f"children {report['hung']} hung (deadlock) and were killed"
    names = report["names"]
    assert len(names) == 80, f"{len(names)} of 80 blocks reported: a child failed\n{done.stderr[-4000:]}"
    _assert_all_removed(names)


_HALF_IMPORTED = """
import importlib.abc, importlib.machinery, sys
import shmem

class InTheMiddle(importlib.abc.MetaPathFinder):
    # Uses shmem.Event while its module's first import runs, as a signal handler would.
    def find_spec(self, name, path, target=None):
        if name != "shmem._kinds.event":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real = spec.loader.exec_module

        def exec_module(module):
            try:
                shmem.Event
            except ImportError as err:
                print(type(err).__name__, err)
            real(module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, InTheMiddle())
shmem.Event().close()
print("then it works")
"""


def test_a_name_used_in_the_middle_of_its_own_first_import_says_so() -> None:
    """shmem imports most kinds on first use. A signal handler that uses one while the main
    thread's first use is still importing it met a half-imported module: AttributeError "most
    likely due to a circular import". It is an ImportError that says what happened and what to do."""
    done = subprocess.run(script(_HALF_IMPORTED), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "ImportError shmem.Event is being imported by this thread already: a signal handler that "
        "interrupted its first use? Use shmem.Event once before installing the handler",
        "then it works",
    ]
