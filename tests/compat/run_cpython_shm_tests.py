"""CPython's own shared-memory tests, run against shmem.

    python tests/compat/run_cpython_shm_tests.py [-v] [--start-method METHOD ...]

Runs ``_TestSharedMemory`` of the installed Python's ``test._test_multiprocessing``
(SharedMemory, ShareableList and SharedMemoryManager, as CPython's
``test_multiprocessing_{fork,spawn,forkserver}`` run it: once per start method)
with ``multiprocessing.shared_memory`` resolving to ``shmem.shared_memory`` and
``multiprocessing.managers.SharedMemoryManager`` / ``SharedMemoryServer`` to
shmem's. Exit status 0 when every test that runs passes and nothing leaked,
1 otherwise, 2 when the suite cannot be loaded. With
``SHMEM_CONFORMANCE_TARGET=stdlib`` in the environment the same selection
runs on the standard library itself, unpatched: the baseline.

The tests are CPython's, unchanged. The only ones skipped are listed in
``SKIPPED`` below, each with the reason: they inspect the standard library's
internals (its resource tracker, its private attributes and helpers), not the
behaviour its documentation promises. Anything else that fails is a
difference from the standard library to look at.

Every process the tests start sees the same substitution: the patch is made
when this file is imported, which a ``spawn`` or ``forkserver`` child does
(as ``__mp_main__``) before it unpickles its target.
"""

from __future__ import annotations

import argparse
import faulthandler
import multiprocessing
import multiprocessing.managers
import os
import sys
import time
import unittest
from typing import Any, Dict, List, Tuple

# SHMEM_CONFORMANCE_TARGET=stdlib runs the same selection on the standard
# library itself: the baseline that shows the harness and the skips are sound.
AGAINST_STDLIB = os.environ.get("SHMEM_CONFORMANCE_TARGET") == "stdlib"

if __name__ == "__main__":
    # Blocks shmem names itself carry this run's prefix (the processes the tests
    # start inherit it, and keep it), so the leak check looks at this run's only.
    os.environ["SHMEM_NAME_PREFIX"] = f"cpyshm{os.getpid()}_"

import shmem.managers  # noqa: E402 - the prefix must be set before shmem is imported
import shmem.shared_memory  # noqa: E402


def _substitute() -> None:
    """Make the standard library's import paths lead to shmem, in this process."""
    sys.modules["multiprocessing.shared_memory"] = shmem.shared_memory
    multiprocessing.shared_memory = shmem.shared_memory  # type: ignore[attr-defined]
    multiprocessing.managers.SharedMemoryManager = shmem.managers.SharedMemoryManager  # type: ignore[misc]
    multiprocessing.managers.SharedMemoryServer = shmem.managers.SharedMemoryServer  # type: ignore[misc]


if not AGAINST_STDLIB:
    _substitute()

try:
    from test import _test_multiprocessing as cpython
except ImportError as err:  # some distributions ship Python without its test package
    print(f"CPython's test package is not installed with this Python ({err}): nothing to run", file=sys.stderr)
    sys.exit(2)

# The tests that are not run, and why: each inspects the standard library's
# internals. What they check that the documentation promises is checked on
# shmem elsewhere, named in each reason.
SKIPPED: Dict[str, str] = {
    "test_shared_memory_basics": (
        "patches the private multiprocessing.shared_memory._make_filename, reads the private "
        "_SHM_NAME_PREFIX, _USE_POSIX and SharedMemory._name, and subclasses SharedMemory with the "
        "private _flags = O_CREAT|O_RDWR to attach-or-create. Its public checks: "
        "tests/compat/test_cpython_public_parts.py"
    ),
    "test_shared_memory_recreate": "only about the private _make_filename helper returning a taken name (mocked)",
    "test_shared_memory_name_with_embedded_null": (
        "reads _USE_POSIX and rewrites the private SharedMemory._name to make unlink() fail. Its public "
        "check (a NUL in a name is a ValueError): tests/compat/test_cpython_public_parts.py"
    ),
    "test_shared_memory_SharedMemoryManager_reuses_resource_tracker": (
        "about the standard library's resource tracker (bpo-36867), in a child started with -I, which "
        "imports the real multiprocessing.managers. shmem's counterpart: tests/test_reaper.py "
        "(one reaper per process tree)"
    ),
    "test_shared_memory_cleaned_after_process_termination": (
        "its child (python -E) imports the real multiprocessing.shared_memory, and it requires the resource "
        "tracker's leak warning and calls resource_tracker.unregister. shmem's counterpart: "
        "tests/test_lifecycle.py (a terminated or SIGKILLed creator's block is removed, silently)"
    ),
    "test_shared_memory_tracking": (
        "requires the resource tracker's leak warning from a child started with -I (the real "
        "multiprocessing.shared_memory) and calls resource_tracker.unregister(mem._name), a private "
        "attribute. shmem's counterpart: tests/test_lifecycle.py (an attacher's exit never removes a block, gh-82300)"
    ),
}

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]


def _suite_class(start_method: str) -> type:
    """CPython's test class as its test_multiprocessing_<start method> builds
    it, with the tests in SKIPPED skipped and the start method set around it."""
    base = cpython._TestSharedMemory

    class Conformance(base, cpython.ProcessesMixin, unittest.TestCase):  # type: ignore[misc,valid-type]
        @classmethod
        def setUpClass(cls) -> None:
            cls._previous_method = multiprocessing.get_start_method(allow_none=True)
            multiprocessing.set_start_method(start_method, force=True)
            super().setUpClass()

        @classmethod
        def tearDownClass(cls) -> None:
            super().tearDownClass()
            multiprocessing.set_start_method(cls._previous_method, force=True)

    for name, reason in SKIPPED.items():
        if hasattr(base, name):
            setattr(Conformance, name, unittest.skip(reason)(getattr(base, name)))
    Conformance.__name__ = Conformance.__qualname__ = f"WithProcessesTestSharedMemory[{start_method}]"
    return Conformance


def _report_substitution(conn: Any) -> None:
    """In a child: whether the test module there sees shmem (run by ``_children_see_shmem``)."""
    conn.send(
        (
            cpython.shared_memory is shmem.shared_memory,
            multiprocessing.managers.SharedMemoryManager is shmem.managers.SharedMemoryManager,
        )
    )
    conn.close()


def _children_see_shmem(method: str) -> bool:
    """Whether a process started with ``method`` imports the test module with the
    substitution made (else a child would test the standard library unnoticed)."""
    ctx = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_report_substitution, args=(writer,))
    child.start()
    writer.close()
    seen = reader.recv() if reader.poll(60) else None
    child.join(60)
    return seen == (True, True)


def _leftovers(prefix: str, pid: int) -> List[str]:
    """Blocks this run made and left: shmem's generated names, and the names
    CPython's tests build from this process's pid."""
    return sorted(
        name
        for name in os.listdir("/dev/shm")
        if name.startswith(prefix) or (name.startswith("test0") and name.endswith(str(pid)))
    )


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--start-method", action="append", choices=START_METHODS, dest="methods")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a hung run is ended (300)")
    args = parser.parse_args(argv)

    # A watchdog: a test that hangs ends the run, with every thread's traceback, instead of CI's job.
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    target = "the standard library (baseline)" if AGAINST_STDLIB else "shmem"
    if (cpython.shared_memory is shmem.shared_memory) == AGAINST_STDLIB:
        print(f"the test module did not pick up {target}'s shared_memory: nothing would be tested", file=sys.stderr)
        return 2
    print(f"CPython {sys.version.split()[0]}'s _TestSharedMemory ({cpython.__file__}) against {target}")
    for name, reason in SKIPPED.items():
        if hasattr(cpython._TestSharedMemory, name):
            print(f"  skipped {name}: {reason}")

    prefix = os.environ["SHMEM_NAME_PREFIX"]
    results: List[Tuple[str, unittest.TestResult]] = []
    started = time.monotonic()
    for method in args.methods or START_METHODS:
        print(f"=== start method {method}", flush=True)
        if _children_see_shmem(method) == AGAINST_STDLIB:
            print(f"a process started with {method!r} does not test {target}: nothing would be tested")
            return 2
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(_suite_class(method))
        result = unittest.TextTestRunner(verbosity=2 if args.verbose else 1, stream=sys.stdout).run(suite)
        results.append((method, result))

    # shmem removes a block once its creator and users are gone: give the reaper a moment.
    deadline = time.monotonic() + 5
    while _leftovers(prefix, os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked = _leftovers(prefix, os.getpid())
    for name in leaked:  # made by this run (its prefix or its pid): ours to remove
        os.unlink("/dev/shm/" + name)

    ran = sum(r.testsRun - len(r.skipped) for _, r in results)
    skipped = sum(len(r.skipped) for _, r in results)
    bad = [(m, r) for m, r in results if not r.wasSuccessful()]
    took = time.monotonic() - started
    print(f"\n{ran} tests run, {skipped} skipped, under {len(results)} start methods in {took:.1f} s")
    for method, result in bad:
        print(f"FAILED under {method}: {len(result.failures)} failures, {len(result.errors)} errors")
    if leaked:
        print(f"FAILED: blocks left in /dev/shm: {leaked}")
    if ran == 0:
        print("FAILED: no test ran")
    return 1 if bad or leaked or ran == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
