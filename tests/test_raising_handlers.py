"""A signal handler that raises (Ctrl-C's KeyboardInterrupt, or any exception) while the
main thread is inside a shmem call, or asleep in one: that exception comes out, and
nothing else; no mutex stays held, no signal stays blocked, and the next call works.

Before: a handler that raised between a Semaphore's (or Event's, Condition's, Barrier's)
internal lock and the ``try`` that lets it go left that mutex held by a live thread (every
later call, in every process, waited for good, and this thread got RuntimeError); one that
raised around a Broadcast's sleep came out as PermissionError; in the pure-Python path, one
that raised inside ``signal.pthread_sigmask`` left every signal blocked in the thread, and a
Condition.wait could hand back its lock one time too few.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict

import pytest
from _core_workers import TESTS_DIR

from shmem._kinds import lock_layout


@pytest.mark.parametrize("implementation", ["C", "pure Python"])
def test_a_raising_handler_leaves_every_primitive_as_it_was(implementation: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SHMEM_PURE_PYTHON", "SHMEM_REQUIRE_SPEEDUPS")}
    if implementation == "pure Python":
        env["SHMEM_PURE_PYTHON"] = "1"
    elif not lock_layout.ACCELERATED:
        pytest.skip("the C extension is not in use in this run")
    done = subprocess.run(
        [sys.executable, os.path.join(TESTS_DIR, "_raising_handler.py"), "0.4"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report: Dict[str, Dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])
    wrong = {name: r for name, r in report.items() if r["other"] or r["left_blocked"]}
    assert not wrong, f"besides the handler's exception, or a signal left blocked: {wrong}"
    unreached = [name for name, r in report.items() if r["booms"] == 0]
    assert not unreached, f"the handler never interrupted: {unreached}"
